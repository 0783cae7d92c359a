import io

import numpy as np
import pytest
from PIL import Image

from seechat.data.images import list_images, load_image
from seechat.errors import ImageError


def _noise_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def test_reads_files_and_bytes_as_rgb(tmp_path):
    data = _noise_png()
    (tmp_path / "x.png").write_bytes(data)
    for src in (tmp_path / "x.png", data):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (96, 96)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("hello, not a picture"), "is not an image file"),
        (lambda p: p.write_bytes(_noise_png()[:600]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b""), "is not an image file"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, make, needle):
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert needle in str(err.value) and "img.png" in str(err.value)


def test_oversized_images_are_refused_before_decoding(tmp_path):
    big = Image.new("1", (9000, 9000))  # 81 MP, above the 64 MP default, yet tiny on disk
    path = tmp_path / "bomb.png"
    big.save(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(_noise_png(), max_pixels=100)


def test_list_images_sorted_by_name_and_filtered(tmp_path):
    for name in ("b.PNG", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
