"""Image paths in data records (data/files.py, data/images.py), issue 36: a path that cannot be a
file here (a NUL character, a name or a path longer than the file system allows, a link loop, a
FIFO, a device) is one line that names the record and says what is there; never a traceback, and
never a read that blocks."""

import json
import os

from helpers import assert_clean_failure, image_chat

from piece_surgery.models.tiny import write_png


def odd_images(folder):
    """Image paths (relative to `folder`) that are no image file, and what a message says of each."""
    (folder / "img").mkdir()
    write_png(folder / "img" / "a.png", 20, 20, seed=1)
    os.mkfifo(folder / "img" / "pipe.png")
    os.symlink("loop.2", folder / "img" / "loop.png")
    os.symlink("loop.png", folder / "img" / "loop.2")
    os.symlink("/dev/null", folder / "img" / "device.png")
    return {
        "img/a\0.png": "may not contain a NUL character",
        "img/" + "x" * 300 + ".png": "longer than the file system allows",
        "img/" + "y/" * 2100 + "a.png": "longer than the file system allows",
        "img/pipe.png": "is a FIFO",
        "img/loop.png": "is a symbolic link loop",
        "img/loop.png/a.png": "is a symbolic link loop",
        "img/device.png": "is a device",
    }


def test_an_image_path_that_is_no_image_file_is_one_line(llava, tmp_path, cli):
    cases = odd_images(tmp_path)
    delta = tmp_path / "delta"
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(image_chat("img/a.png")) + "\n")
    assert cli("train", llava, "--data", good, "-o", delta, "--max-steps", "1", "-q")[0] == 0
    for i, (path, fragment) in enumerate(cases.items()):
        data = tmp_path / f"odd{i}.jsonl"
        data.write_text(json.dumps(image_chat("img/a.png")) + "\n" + json.dumps(image_chat(path)) + "\n")
        out = tmp_path / "out"
        for args in (
            ["train", llava, "--data", data, "-o", out, "--max-steps", "1"],
            ["score", llava, "--data", data, "-o", tmp_path / "out.safetensors"],
            ["eval", llava, delta, "--data", data, "--general", good],
        ):
            line = assert_clean_failure(cli(*args, "-q"), fragment, output=out)
            assert f"odd{i}.jsonl:2" in line, line


def test_outputs_are_checked_around_image_paths_that_cannot_be_followed(llava, tmp_path, cli):
    """The overlap check reads a data file's image paths before the reader does: one it cannot
    follow is left to the reader's message, and the others are still protected."""
    cases = odd_images(tmp_path)
    # a NUL character is refused with the record, before any path is looked at
    records_that_read = [p for p in cases if "\0" not in p]
    # a PNG under a mask's name, so that the output passes the suffix check and meets the overlap check
    image = tmp_path / "img" / "photo.safetensors"
    image.write_bytes((tmp_path / "img" / "a.png").read_bytes())
    data = tmp_path / "data.jsonl"
    paths = ["img/photo.safetensors", *records_that_read]
    data.write_text("".join(json.dumps(image_chat(p)) + "\n" for p in paths))
    before = image.read_bytes()
    result = cli("score", llava, "--data", data, "-o", image, "--overwrite", "-q")
    assert_clean_failure(result, "overlaps input")
    assert image.read_bytes() == before
