"""Fixtures of the reliability tests: a real gallery index, throwaway certificates, process bookkeeping.

Every process a test starts is registered with `procs` and SIGKILLed in the fixture's
finally, whatever the test did.
"""
from __future__ import annotations

import datetime
import ipaddress
import pathlib
import shutil

import pytest

from tests.support.processes import Procs


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture(scope="session")
def gallery(tiny_model, tmp_path_factory):
    """A 2-shard index of the tiny model's synthetic faces, minus 4 people kept for enrolment.

    Returns a dict: template (index path, never modified: copy it), enc (FaceEncoder), photos
    {person: [paths]}, enrol_people (held-out names), embeddings {source: float32 [E]}.
    """
    from indexer.face_id import face_id_for_photo
    from indexer.manifest import ModelMeta
    from indexer.writer import IndexWriter
    from opqn_model.api import FaceEncoder
    from query_node.face_model import photo_features

    enc = FaceEncoder.load(tiny_model.path)
    photos: dict[str, list[pathlib.Path]] = {}
    for p in sorted(tiny_model.data.rglob("*.png")):
        photos.setdefault(p.parent.name, []).append(p)
    people = sorted(photos)
    held_out = people[-4:]
    gallery_photos = [p for person in people[:-4] for p in photos[person]]
    contents = [p.read_bytes() for p in gallery_photos]
    feats, kept, _ = photo_features(enc, contents)
    template = tmp_path_factory.mktemp("reliability") / "template"
    w = IndexWriter(str(template), ModelMeta.from_encoder(enc), shard_count=2, segment_rows=40)
    w.add([face_id_for_photo(contents[i]) for i in kept], [gallery_photos[i].parent.name for i in kept],
          [str(gallery_photos[i]) for i in kept], enc.codec.encode(feats))
    w.commit("gallery")
    embeddings = {str(gallery_photos[i]): feats[j] for j, i in enumerate(kept)}
    return dict(template=template, enc=enc, photos=photos, enrol_people=held_out, embeddings=embeddings,
                model=tiny_model.path, faces=len(kept))


@pytest.fixture
def index(gallery, tmp_path):
    """A private copy of the gallery index for one test."""
    dst = tmp_path / "idx"
    shutil.copytree(gallery["template"], dst)
    return dst


# ---------------------------------------------------------------- certificates


class Certs:
    """Throwaway PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate,
    and a second CA (`other_ca`) that signed nothing here."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        ca_key, ca_cert = _self_signed("facepq test CA")
        self.ca = self._write("ca.pem", _pem_cert(ca_cert))
        other_key, other_cert = _self_signed("facepq other CA")
        self.other_ca = self._write("other-ca.pem", _pem_cert(other_cert))
        for name in ("server", "client"):
            key, cert = _issued(ca_key, ca_cert, f"facepq {name}")
            setattr(self, f"{name}_cert", self._write(f"{name}.pem", _pem_cert(cert)))
            setattr(self, f"{name}_key", self._write(f"{name}-key.pem", _pem_key(key)))

    def _write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.write_bytes(data)
        return str(path)


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject, issuer, public_key):
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _self_signed(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(cn), _name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issued(ca_key, ca_cert, cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (_builder(_name(cn), ca_cert.subject, key.public_key())
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    pytest.importorskip("cryptography", reason="the dev extra `cryptography` generates the test certificates")
    return Certs(tmp_path_factory.mktemp("certs"))
