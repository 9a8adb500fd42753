import numpy as np
import pytest

from amortize import io
from amortize.corpus import augment, load_corpus, sample_crops
from amortize.errors import BadArgument, BadInput


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    io.write_png(tmp_path / "a.png", rng.uniform(size=(80, 100, 3)))
    io.write_png(tmp_path / "b.png", rng.uniform(size=(70, 64, 3)))
    io.write_png(tmp_path / "small.png", rng.uniform(size=(40, 200, 3)))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    return tmp_path


def test_bad_files_are_skipped_with_a_warning_each_and_counted(tmp_path):
    lines = []
    corpus = load_corpus(_folder(tmp_path), (64, 64), warn=lines.append)
    assert [p.name for p in corpus.files] == ["a.png", "b.png"]
    assert sorted(p.name for p, _ in corpus.skipped) == ["empty.png", "small.png", "text.jpg"]
    assert len(lines) == 3 and all("skipped" in line and "\n" not in line for line in lines)
    assert any("smaller than the 64x64 crop" in line for line in lines)
    assert corpus.pixels == 80 * 100 + 70 * 64
    assert corpus.n_crops((64, 64)) == round((8000 + 4480) / 4096)


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInput, match="no usable image"):
        load_corpus(tmp_path, (64, 64), warn=lambda line: None)


@pytest.mark.parametrize("make, words", [
    (lambda p: p, "no PNG, JPEG or TIFF"),
    (lambda p: p / "missing", "no such folder"),
])
def test_empty_or_missing_folder(tmp_path, make, words):
    with pytest.raises(BadInput, match=words):
        load_corpus(make(tmp_path), (64, 64))


def test_crops_are_in_range_reproducible_and_augmented(tmp_path):
    corpus = load_corpus(_folder(tmp_path), (64, 64), warn=lambda line: None)
    a = sample_crops(corpus, np.random.default_rng(1), 5, (64, 64))
    b = sample_crops(corpus, np.random.default_rng(1), 5, (64, 64))
    assert a.shape == (5, 64, 64, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    rect = sample_crops(corpus, np.random.default_rng(2), 3, (64, 48))
    assert rect.shape == (3, 64, 48, 3)


def test_augment_gives_the_eight_symmetries():
    crop = np.arange(9).reshape(3, 3, 1)
    variants = {augment(crop, code).tobytes() for code in range(8)}
    assert len(variants) == 8


def _crop_source_views(corpus, crop, mode, n=40):
    """For each sampled crop, which views of the image it matches ("same", "mirror", "other")."""
    image = corpus.images[0].astype(np.float32) / 255.0
    h, w = crop
    windows = {image[y:y + h, x:x + w].tobytes() for y in range(image.shape[0] - h + 1)
               for x in range(image.shape[1] - w + 1)}
    views = set()
    for c in sample_crops(corpus, np.random.default_rng(3), n, crop, mode):
        if c.tobytes() in windows:
            views.add("same")
        elif np.ascontiguousarray(c[:, ::-1]).tobytes() in windows:
            views.add("mirror")
        else:
            views.add("other")
    return views


def test_mirror_and_none_keep_the_light_from_one_side(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    rng = np.random.default_rng(0)
    io.write_png(folder / "a.png", rng.random((40, 44, 3)).astype(np.float32))
    corpus = load_corpus(folder, (36, 36))
    assert _crop_source_views(corpus, (36, 36), "none") == {"same"}
    assert _crop_source_views(corpus, (36, 36), "mirror") == {"same", "mirror"}
    assert "other" in _crop_source_views(corpus, (36, 36), "turns")  # turned or flipped upside down
    with pytest.raises(BadArgument, match="augmentation"):
        sample_crops(corpus, rng, 2, (36, 36), "spin")
