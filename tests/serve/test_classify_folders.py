"""An image folder as people have it, end to end: `/classify` preprocesses a PNG or JPEG exactly as training
decoded the folder (modes, sizes, the resize policy the card records), and a folder of real Fashion-MNIST images
with every quirk is trained, selected, exported and served through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from datafixtures import tagged_images, write_quirky_fashion_folder
from PIL import Image
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.contracts.card import PIXEL_SCALE, Preprocess, read_card
from okdpipe.datasets import load_dataset
from okdpipe.datasets.decoding import ImageDecoder
from okdpipe.serve.preprocess import image_to_tensor

MEAN, STD = (0.449,), (0.226,)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample_images() -> list[tuple[str, bytes]]:
    """Noise images in the modes, sizes and formats of people's folders, as (file name, bytes)."""
    rgb = Image.fromarray(tagged_images(1, (30, 45, 3), 1, seed=4)[0][0])  # 45 wide, 30 high
    wide = (tagged_images(1, (24, 40), 1, seed=5)[0][0].astype(np.uint16) * 257).astype(np.uint16)
    return [
        ("rgb.png", encoded(rgb, "PNG")),
        ("rgb.jpg", encoded(rgb, "JPEG", quality=85)),
        ("gray.jpg", encoded(rgb.convert("L"), "JPEG")),
        ("rgba.png", encoded(rgb.convert("RGBA"), "PNG")),
        ("palette.png", encoded(rgb.convert("P"), "PNG")),
        ("cmyk.jpg", encoded(rgb.convert("CMYK"), "JPEG")),
        ("sixteen.png", encoded(Image.fromarray(wide), "PNG")),
        ("small.png", encoded(rgb.resize((12, 9)), "PNG")),
    ]


@pytest.mark.parametrize("resize", ["stretch", "shorter-side"])
@pytest.mark.parametrize("channels", [1, 3])
def test_classify_preprocessing_equals_the_training_decode(tmp_path, resize, channels):
    """The same files through the image-folder loader and through serve's /classify preprocessing: equal values."""
    samples = sample_images()
    for name, raw in samples:
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / name).write_bytes(raw)
    (tmp_path / "train" / "b").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "train" / "b" / "z.png")
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, image_size=20, channels=channels, resize=resize)
    recipe = Preprocess(20, 20, channels, PIXEL_SCALE, MEAN * channels, STD * channels, resize)
    for index, (name, raw) in enumerate(sorted(samples)):
        trained = recipe.normalise(bundle.train.images[index : index + 1].numpy())
        np.testing.assert_array_equal(image_to_tensor(raw, recipe), trained, err_msg=name)


def test_classify_shorter_side_crops_the_centre_and_sixteen_bit_keeps_its_top_bits():
    """Values computed by hand: a 48x32 image with 8-pixel dark bars loses them to the centre crop, and 16-bit
    0x1234 becomes 0x12 (Pillow's plain conversion would clip it to 255)."""
    pixels = np.full((32, 48), 200, np.uint8)
    pixels[:, :8] = pixels[:, 40:] = 10
    recipe = Preprocess(32, 32, 1, PIXEL_SCALE, (0.5,), (0.25,), "shorter-side")
    expected = np.full((1, 1, 32, 32), (200 / 255 - 0.5) / 0.25, np.float32)
    np.testing.assert_allclose(image_to_tensor(encoded(Image.fromarray(pixels), "PNG"), recipe), expected, rtol=1e-6)
    sixteen = Image.fromarray(np.full((32, 32), 0x1234, np.uint16))
    tensor = image_to_tensor(encoded(sixteen, "PNG"), recipe)
    np.testing.assert_allclose(tensor, np.full((1, 1, 32, 32), (0x12 / 255 - 0.5) / 0.25, np.float32), rtol=1e-6)


# --- item 6: real images, every quirk, through the CLI ------------------------------------------------------------

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quirky_real_folder_trains_selects_exports_and_serves(tmp_path, start_server):
    data, run, out = tmp_path / "photos", tmp_path / "run", tmp_path / "export"
    notable = write_quirky_fashion_folder(data, {"trouser": 14, "bag": 14, "sneaker": 3})  # sneaker: unbalanced
    options = ["--set", "data_options.image_size=28", "--set", "data_options.channels=1"]
    options += ["--set", "data_options.resize=shorter-side"]
    common = ["--dataset", "imagefolder", "--data-dir", str(data), "--arch", "resnet8", "--device", "cpu"]
    refused = runner.invoke(app, ["distill", *common, *options, "--out", str(run)])
    assert refused.exit_code == 2 and refused.stderr.startswith("error: 1 unreadable image file(s)")
    assert str(notable["truncated"]) in refused.stderr and len(refused.stderr.splitlines()) == 1
    trained = cli(
        "distill", *common, *options, "--epochs", "1", "--batch-size", "8", "--skip-bad-images", "--out", str(run)
    )
    assert "no test split, so no test metrics" in trained
    manifest = json.loads((run / "manifest.json").read_text())
    # 31 readable images; validation holds round(0.1 * 14) = 1 of trouser and of bag, and 1 of sneaker's 3.
    assert (manifest["dataset"]["train"], manifest["dataset"]["val"], manifest["dataset"]["test"]) == (28, 3, 0)
    assert manifest["dataset"]["labels"] == ["bag", "sneaker", "trouser"]
    cli("select", str(run))
    cli("export", str(run / "model.pt"), "--out", str(out))
    card = read_card(out / "fp32")
    assert card.preprocess.resize == "shorter-side" and (card.channels, card.height, card.width) == (1, 28, 28)
    with start_server(artifact=out / "fp32") as server:
        served = classify(server.url, card.name, [notable["png"], notable["jpeg"]])
    expected = reference_scores(out / "fp32", card, [notable["png"], notable["jpeg"]])
    for answer, scores in zip(served, expected):
        assert answer["labels"] == [card.labels[i] for i in np.argsort(-scores)[:3]]
        np.testing.assert_allclose(answer["scores"], np.sort(scores)[::-1][:3], rtol=1e-5, atol=1e-7)


def classify(url: str, name: str, files: list[Path]) -> list[dict]:
    """POST each file's bytes as the raw body of /classify (top 3)."""
    with httpx.Client(base_url=url, timeout=30.0) as client:
        answers = [client.post(f"/v2/models/{name}/classify?top_k=3", content=path.read_bytes()) for path in files]
    assert [a.status_code for a in answers] == [200] * len(files), [a.text for a in answers]
    return [a.json() for a in answers]


def reference_scores(artifact: Path, card, files: list[Path]) -> list[np.ndarray]:
    """Softmax of onnxruntime on each file as the training loader decodes it (ImageDecoder, the card's policy)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(card.model_path), providers=["CPUExecutionProvider"])
    decoder = ImageDecoder((card.height, card.width), card.channels, card.preprocess.resize)
    scores = []
    for path in files:
        inputs = card.preprocess.normalise(decoder(path).transpose(2, 0, 1)[None])
        logits = session.run(None, {card.input_name: inputs.astype(np.float32)})[0][0].astype(np.float64)
        scores.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    return scores
