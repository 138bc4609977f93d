"""What the methods' step tests do not reach, pinned by value: each model's own augmentation (per image, per
view), the trainer's BN recalibration sample, evaluation of weight-averaged candidates after recalibration, the
sample's shuffle, and the optimiser settings each method's paper trains with (FFSD's decoders included)."""

import contextlib

import torch
from test_method_one import make_method

from okdpipe.config import DistillConfig, build_config
from okdpipe.datasets.augment import draw_augment
from okdpipe.datasets.loader import Batch
from okdpipe.datasets.spec import AugmentConfig
from okdpipe.datasets.views import ViewAugment, augment_policy, draw_policy
from okdpipe.distill.evaluate import calibration_indices, evaluate_run
from okdpipe.distill.trainer import build_session, with_method_defaults_of
from okdpipe.run import RunDir


def one_image_views(policy: tuple[ViewAugment, ...], count: int, size: int):
    """`count` copies of one image (every pixel >= 40, so only cutout makes a zero) through `policy`, without the
    dataset's crop or flip: (views [V, count, C, size, size], crop/flip/cutout draws, policy draws)."""
    config = AugmentConfig(crop_padding=0, hflip=False)
    pixels = torch.randint(40, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    images = pixels.repeat(count, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    draws = draw_augment(generator, len(policy), count, config, (size, size))
    extra = draw_policy(generator, policy, count)
    window, extra_window = draws.window(0, count), extra.window(0, count)
    return augment_policy(images, window, extra_window, config, policy, torch.zeros(3), torch.ones(3)), draws, extra


def test_each_image_rotates_by_its_own_angle_drawn_both_ways_within_the_range():
    out, _, extra = one_image_views((ViewAugment(hflip=False, rotate=15.0),), count=64, size=16)
    angles = extra.angles[0]
    assert float(angles.abs().max()) <= 15.0 and float(angles.min()) < -5.0 and float(angles.max()) > 5.0
    # One angle per image, not one per batch (nearest-neighbour rotations within about 3 degrees of 0 leave a
    # 16x16 image as it is, so not all 64 differ).
    assert len({tuple(x.flatten().tolist()) for x in out[0]}) > 32


def test_two_cutout_views_each_cut_the_hole_their_own_draw_places():
    """View v of image i is zero exactly on the 4x4 square whose top-left is centre - 2, centre = view v's draw."""
    out, draws, _ = one_image_views((ViewAugment(hflip=False, cutout=4), ViewAugment(hflip=False, cutout=4)), 16, 8)
    rows, cols = torch.arange(8)[:, None], torch.arange(8)[None, :]
    for v in range(2):
        for i, (y, x) in enumerate(draws.centres[v].tolist()):
            hole = (rows >= y - 2) & (rows < y + 2) & (cols >= x - 2) & (cols < x + 2)
            assert torch.equal((out[v, i] == 0).all(dim=0), hole), (v, i)
    assert not torch.equal(draws.centres[0], draws.centres[1])


def session(tmp_path, **options):
    cfg = DistillConfig(arch="resnet8", dataset="synthetic", val_split=0.25, **options)
    return build_session(cfg, RunDir(tmp_path / "r"))


def test_okdph_trains_each_model_on_its_own_augmentation_kind_unless_told_same(tmp_path):
    """Two students: rotation for student 0, cutout for student 1 and RandAugment(2, 9) without flip for the
    hybrid's view (the official code's kinds); --view-augment same gives every view the dataset's own, as does
    every other method."""
    expected = (ViewAugment(rotate=15.0), ViewAugment(cutout=16), ViewAugment(hflip=False, randaugment=(2, 9)))
    assert session(tmp_path, method="okdph").train_loader.source.policy == expected
    assert session(tmp_path, method="okdph", view_augment="same").train_loader.source.policy is None
    assert session(tmp_path, method="dml").train_loader.source.policy is None


def test_training_recalibrates_on_the_runs_seeded_sample_of_twenty_eval_batches(tmp_path):
    """20 batches of --eval-batch-size (40 of the 48 training images), class-balanced, drawn with the run's seed
    (so select, drawing with the same seed, records the sample training used)."""
    s = session(tmp_path, method="vanilla", eval_batch_size=2, seed=7)
    sample, train = s.calib_loader.split, s.bundle.train
    assert len(sample) == 20 * 2 and len(train) == 48
    assert torch.bincount(sample.labels, minlength=4).tolist() == [10, 10, 10, 10]
    assert torch.equal(sample.images, train.subset(calibration_indices(train.labels, 40, 4, seed=7)).images)


def test_calibration_sample_is_shuffled_after_it_is_dealt():
    """Dealt round-robin, every run of 4 would hold one image of each of the 4 classes; the shuffle mixes them."""
    labels = torch.arange(40) // 10
    blocks = labels[calibration_indices(labels, 12, 4, seed=3)].view(3, 4)
    assert any(len(set(block.tolist())) < 4 for block in blocks)


class ClassZero(torch.nn.Module):
    """A network that answers class 0 (of 5) for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 5).float()


def test_evaluation_scores_each_mean_teacher_as_recalibrated():
    """evaluate_run hands every weight-averaged candidate to `calibrate` and scores what it returns: a calibrate
    that returns an always-class-0 network scores 3/8 on labels with three 0s in eight."""
    method, students = make_method("pcl")
    labels = torch.tensor([0, 1, 0, 2, 3, 0, 4, 1])
    batches = [Batch(torch.randn(1, 8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), labels)]
    calibrated = []

    def calibrate(model):
        calibrated.append(model)
        return ClassZero()

    scores = evaluate_run(students, method, batches, contextlib.nullcontext, calibrate)
    assert len(calibrated) == 3
    assert [scores[f"mean-teacher:{i}"]["top1"] for i in range(3)] == [3 / 8] * 3


def test_each_method_trains_with_its_papers_optimiser_unless_told_otherwise():
    """methods.md, Recipes: SGD momentum 0.9, Nesterov for PCL and FFSD, weight decay 5e-4 but 1e-4 for FFSD;
    a value the user sets wins."""
    papers = {"pcl": ("nesterov", 5e-4), "ffsd": ("nesterov", 1e-4)}
    for name in ("vanilla", "dml", "one", "pcl", "mbde", "okdph", "ffsd"):
        optimizer, decay = papers.get(name, ("sgd", 5e-4))
        cfg = with_method_defaults_of(build_config({"method": name, "arch": "resnet8"}, {}, []))
        assert (cfg.optimizer, cfg.momentum, cfg.weight_decay) == (optimizer, 0.9, decay), name
    chosen = with_method_defaults_of(build_config({"method": "ffsd", "weight_decay": 5e-4}, {}, ["optimizer=sgd"]))
    assert (chosen.optimizer, chosen.weight_decay) == ("sgd", 5e-4)


def test_ffsd_decoders_train_with_adams_weight_decay():
    """FFSD's code: one Adam per decoder, lr 1e-3 and weight decay 1e-4 (or the decoder_weight_decay given)."""
    for decay in (1e-4, 3e-4):
        method, _ = make_method("ffsd", layout="peers", count=3, decoder_weight_decay=decay)
        settings = [(o.defaults["lr"], o.defaults["weight_decay"]) for o in method.extra_optimizers()]
        assert settings == [(1e-3, decay)] * 2
