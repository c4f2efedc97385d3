"""The generated Python stubs match proto/facepq/v1/facepq.proto (regenerate: python -m facepq_proto.build --force)."""
import pathlib

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path):
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out = tmp_path / "fds.bin"
    rc = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{include}", f"--descriptor_set_out={out}",
                      str(REPO / "proto/facepq/v1/facepq.proto")])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    from facepq_proto.facepq.v1 import facepq_pb2

    installed = descriptor_pb2.FileDescriptorProto.FromString(facepq_pb2.DESCRIPTOR.serialized_pb)
    for d in (installed, fresh):  # protoc's descriptor set adds json_name, the python plugin omits it
        for msg in d.message_type:
            for f in msg.field:
                f.ClearField("json_name")
    assert installed == fresh, "stubs drifted from the .proto: run `python -m facepq_proto.build --force`"
    assert set(facepq_pb2.DESCRIPTOR.services_by_name) == {"QueryNode", "Coordinator"}
