"""Atomic outputs: a writer killed half-way leaves the previous file and no partial one."""

import pytest

from acemath_mcore.files import atomic_output, write_atomically


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "scores.jsonl"
    write_atomically(path, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(path) as stream:
            stream.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]
    with atomic_output(path) as stream:
        stream.write("new é\n")
        assert path.read_text() == "old\n"  # readers see the old file until the block ends
    assert path.read_text(encoding="utf-8") == "new é\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]
