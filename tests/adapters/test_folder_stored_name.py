"""The folder source tells the pipeline the name a file will have once processed (`meta["stored_name"]`), so the
inspection row keeps the final name, not the inbox path that no longer exists after the move."""

from __future__ import annotations

import pytest

from tests.adapters.test_sources_folder import folder_source, png_bytes, write
from tests.waiting import take


@pytest.mark.parametrize("after", ["move", "mark", "delete"])
def test_stored_name_is_where_the_file_ends_up(tmp_path, after):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    if after == "move":
        (inbox / "processed").mkdir()
        write(inbox / "processed" / "a.png", png_bytes(9))  # an earlier file of the same name
    write(inbox / "a.png", png_bytes(1))
    source = folder_source(inbox, after=after)
    source.start()
    try:
        (frame,) = take(source, 1)
        assert frame.name == str(inbox / "a.png")
        stored = frame.meta["stored_name"]
        frame.done(True)
    finally:
        source.stop(timeout=5)
    assert not (inbox / "a.png").exists()
    if after == "move":
        assert stored.startswith(str(inbox / "processed" / "a.")) and stored != str(inbox / "processed" / "a.png")
        assert (tmp_path / stored).read_bytes() == png_bytes(1)  # absolute path: tmp_path / abs = abs
        assert (inbox / "processed" / "a.png").read_bytes() == png_bytes(9)
    elif after == "mark":
        assert stored == str(inbox / "a.png.done") and (inbox / "a.png.done").is_file()
    else:
        assert stored == str(inbox / "a.png")
