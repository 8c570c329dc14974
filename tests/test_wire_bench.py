from specexec.launch import wire_bench


def test_random_trees_are_valid():
    for n in (1, 64, 300):
        wire_bench.random_tree(n, vocab=1000).validate(1000)


def test_wire_is_measured_per_size():
    rows = wire_bench.measure(sizes=(8, 128), trials=3)
    assert [r.nodes for r in rows] == [8, 128]
    for r in rows:
        assert r.round_trip_ms > 0 and r.request_bytes > 8 * r.nodes
    assert rows[1].request_bytes > rows[0].request_bytes
    assert "bytes/node" in wire_bench.format_rows(rows)
