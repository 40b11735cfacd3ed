"""Image-aware routing: the image key of a body, a key's home among live replicas, and the ranks
the router hands Serve (home first unless overloaded)."""

from __future__ import annotations

from actors.routing import Homes, image_key, ranks, rendezvous


def body(*urls: str, text: str = "What?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}]}


def test_the_same_image_gives_the_same_key_whatever_the_text_or_the_turn():
    first = image_key(body("data:image/png;base64,AAAA", text="one"))
    later_turn = body("data:image/png;base64,AAAA", text="two")
    later_turn["messages"] += [{"role": "assistant", "content": "a circle"}, {"role": "user", "content": "colour?"}]
    assert first == image_key(later_turn) and len(first) == 32
    assert image_key(body("data:image/png;base64,AAAB")) != first
    assert image_key(body("s3://b/cat.jpg", "data:image/png;base64,AAAA")) == image_key(body("s3://b/cat.jpg"))


def test_bodies_without_an_image_or_malformed_have_no_key():
    assert image_key({"messages": [{"role": "user", "content": "hi"}]}) is None
    for odd in (None, [], {"messages": "x"}, {"messages": [{"content": [{"type": "image_url"}]}]},
                {"messages": [{"content": [{"type": "image_url", "image_url": {"url": ""}}]}]}):
        assert image_key(odd) is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_goes():
    replicas = ["a", "b", "c", "d"]
    keys = [f"k{i}" for i in range(400)]
    before = {k: rendezvous(k, replicas) for k in keys}
    assert set(before.values()) == set(replicas)
    after = {k: rendezvous(k, ["a", "b", "d"]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "c")


def test_a_key_stays_where_it_was_sent_while_that_replica_lives():
    homes = Homes(size=2)
    live = ["a", "b"]
    other = "b" if rendezvous("k", live) == "a" else "a"
    homes.record("k", other)
    assert homes.home("k", live) == other
    assert homes.home("k", ["a", "b", "c"]) == other  # scaling out moves no conversation
    assert homes.home("k", [r for r in live if r != other]) != other  # its replica died
    homes.record("x", "a")
    homes.record("y", "a")  # the oldest key is forgotten
    assert homes.home("k", live) == rendezvous("k", live)


def test_ranks_prefer_the_home_unless_it_is_overloaded():
    homes = Homes(16)
    homes.record("k", "b")
    live = ["a", "b", "c"]
    assert ranks("k", live, homes, lambda r: 2, overload=3) == [["b"], live]
    assert ranks("k", live, homes, lambda r: None, overload=3) == [["b"], live]  # load not known yet
    assert ranks("k", live, homes, lambda r: 3 if r == "b" else 0, overload=3) == [live]
