import numpy as np
import pytest
from PIL import Image

from amortize import io
from amortize.errors import BadArgument, BadInput


def _rgb(h=6, w=7):
    return (np.arange(h * w * 3).reshape(h, w, 3) % 251).astype(np.uint8)


@pytest.mark.parametrize(
    "mode, suffix",
    [("RGB", ".png"), ("RGBA", ".png"), ("L", ".png"), ("RGB", ".jpg"), ("RGB", ".tif"),
     ("L", ".tiff"), ("P", ".png"), ("LA", ".png")],
)
def test_reads_common_modes_as_float_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(_rgb()).convert(mode).save(path)
    img = io.read_image(path)
    assert img.shape == (6, 7, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_reads_16_bit_grey_png(tmp_path):
    path = tmp_path / "deep.png"
    data = np.array([[0, 65535], [32768, 1000]], np.uint16)
    Image.fromarray(data).save(path)
    img = io.read_image(path)
    np.testing.assert_allclose(img[0, 1], 1.0)
    np.testing.assert_allclose(img[1, 0], 32768 / 65535, rtol=1e-4)


def test_rgb_values_are_exact(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_rgb()).save(path)
    np.testing.assert_allclose(io.read_image(path), _rgb() / 255.0, atol=1e-7)


def test_bad_images_get_one_clear_error(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(_rgb(64, 64)).save(truncated, "JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    cases = {
        tmp_path / "missing.png": "no such file",
        empty: "empty file",
        text: "not a readable image",
        tiny: "too small",
        truncated: "corrupt or truncated",
        tmp_path: "is a directory",
    }
    for path, reason in cases.items():
        with pytest.raises(BadInput) as err:
            io.read_image(path)
        message = str(err.value)
        assert str(path) in message and reason in message and "\n" not in message


def test_atomic_write_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "out.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(BadArgument, match="--force"):
        io.write_json(path, {"a": 2})
    io.write_json(path, {"a": 3}, force=True)
    assert '"a": 3' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp files left


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_table_csv_round_trip(tmp_path):
    table = {"x": np.array([1.5, 2.25]), "y": np.array([3.0, 4.0]),
             "radius": np.array([2.0, 5.5]), "presence": np.ones(2), "comp_0": np.array([0.1, 0.9])}
    io.write_table(tmp_path / "t.csv", table)
    back = io.read_table(tmp_path / "t.csv")
    assert list(back) == list(table)
    for k in table:
        np.testing.assert_allclose(back[k], table[k], atol=1e-4)


def test_output_dir_rules(tmp_path):
    out = io.prepare_output_dir(tmp_path / "new" / "deeper", force=False)
    assert out.is_dir()
    (out / "f.txt").write_text("x")
    with pytest.raises(BadArgument, match="not empty"):
        io.prepare_output_dir(out, force=False)
    io.prepare_output_dir(out, force=True)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(BadArgument):
        io.prepare_output_dir(blocker / "sub", force=False)


def test_outputs_get_umask_permissions_not_private(tmp_path):
    import os
    import stat

    from amortize.io import write_bytes

    old = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys
    import time

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            f".a.csv{io.TEMP_MARK}999999999-x1.tmp": False,  # a dead process's: removed
            f".a.json{io.TEMP_MARK}{live.pid}-x2.tmp": True,  # a running process's: kept
            f".a.png{io.TEMP_MARK}{os.getpid()}-x3.tmp": False,  # this process's own: removed
            ".b.csv.k2f9x1qa.tmp": False,  # an earlier version's, an hour old: removed
            ".c.csv.q8w7e6r5.tmp": True,  # an earlier version's, just written: kept
            ".notes.tmp": True,  # not ours
            "b.csv": True,
        }
        for name in names:
            (tmp_path / name).write_text("x")
        old = time.time() - 3600
        os.utime(tmp_path / ".b.csv.k2f9x1qa.tmp", (old, old))
        assert io.remove_stale_temps(tmp_path) == 3
        assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
    finally:
        live.kill()
        live.wait()


def test_huge_and_multi_page_images(tmp_path):
    Image.new("1", (3000, 2000)).save(tmp_path / "big.png")
    with pytest.raises(BadInput, match=r"3000x2000 px .* over the limit .*--max-pixels 6000000"):
        io.read_image(tmp_path / "big.png", max_pixels=5_000_000)
    assert io.read_image(tmp_path / "big.png", max_pixels=6_000_000).shape == (2000, 3000, 3)
    pages = [Image.new("L", (8, 6), 10), Image.new("L", (8, 6), 200), Image.new("L", (8, 6), 90)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    lines = []
    image = io.read_image(tmp_path / "stack.tif", warn=lines.append)
    assert lines == [f"{tmp_path / 'stack.tif'}: 3 pages; only page 0 analysed"]
    np.testing.assert_allclose(image, 10 / 255, atol=1e-6)
