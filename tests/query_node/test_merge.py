"""The k-way merge of per-shard lists is the exact global top-k in the documented order."""
import random

from query_node.merge import Hit, merge_node_replies, merge_shard_lists


def _shard_lists(seed, shards=4, per=30):
    rnd = random.Random(seed)
    all_hits = []
    for s in range(shards):
        hits = [Hit(face_id=s * 1000 + i, person="p", source="x", score=float(rnd.randint(0, 20)), shard=s)
                for i in range(per)]
        # shard order: score desc, then the shard's scan order (here: face_id)
        hits.sort(key=lambda h: (-h.score, h.face_id))
        all_hits.append(hits)
    return all_hits


def test_merge_equals_sorting_everything():
    for seed in range(20):
        lists = _shard_lists(seed)
        expected = sorted((h for lst in lists for h in lst), key=lambda h: (-h.score, h.shard, h.face_id))
        for k in (1, 7, 50, 200):
            assert merge_shard_lists([lst[:k] for lst in lists], k) == expected[:k]


def test_empty_inputs():
    assert merge_shard_lists([], 5) == [] and merge_shard_lists([[]], 5) == []


def test_node_replies_merge_exactly_and_drop_shards_taken_from_another_reply():
    for seed in range(10):
        lists = _shard_lists(seed)
        for k in (1, 10, 25, 120):
            expected = merge_shard_lists(lists, k)
            node_a = merge_shard_lists([lists[0], lists[2]], k)  # a node serving shards 0 and 2
            node_b = merge_shard_lists([lists[1], lists[3]], k)
            assert merge_node_replies([([1, 3], node_b), ([0, 2], node_a)], k) == expected
            # shard 2 also answered by a third node: it must count once, from the reply it was taken from
            node_c = merge_shard_lists([lists[2]], k)
            assert merge_node_replies([([0], node_a), ([1, 3], node_b), ([2], node_c)], k) == expected
            assert [(h.face_id, h.shard) for h in merge_node_replies([([0, 2], node_a)], k)] == \
                [(h.face_id, h.shard) for h in node_a]
