"""`okdpipe.pipeline`: config checks before anything runs, and the skip/invalidate rules of the stage runner.

The runner tests use two cheap file-writing stages in place of the real ones (the rules do not depend on what a
stage computes); the distill-resume test uses a real tiny run.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from okdpipe.config import DistillConfig
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.pipeline import Pipeline, PipelineConfig, Stage, describe, load_pipeline_config, section_sha256
from okdpipe.run import RunDir

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "pipeline-smoke.yaml"


def write_config(tmp_path, data) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- config -------------------------------------------------------------------------------------------------------


def test_both_shipped_configs_load():
    assert load_pipeline_config(SMOKE).distill.dataset == "synthetic"
    fmnist = load_pipeline_config(SMOKE.with_name("pipeline-fmnist.yaml"))
    assert (fmnist.export.quantize, fmnist.bench.batch_sizes, fmnist.gate) == (
        "int8",
        [1, 64],
        ["top1>=0.75", "p99_ms@1<=20"],
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"distil": {}}, "distil: Extra inputs are not permitted"),
        ({"distill": {"epochz": 3}}, "distill.epochz: Extra inputs are not permitted"),
        ({"export": {"quantize": "int4"}}, "export.quantize: Input should be 'none', 'fp16', 'int8' or 'int8-dynamic'"),
        ({"bench": {"batch_sizes": []}}, "bench.batch_sizes: List should have at least 1 item"),
        ({"gate": "top1>=0.8"}, "gate: Input should be a valid list"),
        ({"distill": {"method": "dmx"}}, "unknown method 'dmx'"),
        ({"distill": {"method": "dml", "method_params": {"temp": 2}}}, "bad dml parameter temp"),
        ({"distill": {"arch": "resnet9"}}, "unknown backbone 'resnet9'"),
        ({"distill": {"dataset": "mnist"}}, "unknown dataset 'mnist'"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, data, message):
    path = write_config(tmp_path, data)
    with pytest.raises(OkdpipeError) as error:
        load_pipeline_config(path)
    assert error.value.exit_code == 2
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_a_yaml_syntax_error_names_the_file_once(tmp_path):
    (tmp_path / "p.yaml").write_text("distill: [unclosed\n")
    with pytest.raises(OkdpipeError) as error:
        load_pipeline_config(tmp_path / "p.yaml")
    assert str(error.value).count(str(tmp_path / "p.yaml")) == 1, str(error.value)


def test_missing_config_file_is_bad_usage(tmp_path):
    with pytest.raises(OkdpipeError, match="config file not found"):
        load_pipeline_config(tmp_path / "none.yaml")


def test_section_hash_ignores_key_order_but_not_values():
    a = PipelineConfig(export={"quantize": "int8", "calib_size": 64}).export
    b = PipelineConfig(export={"calib_size": 64, "quantize": "int8"}).export
    c = PipelineConfig(export={"calib_size": 65, "quantize": "int8"}).export
    assert section_sha256(a) == section_sha256(b) != section_sha256(c)
    assert section_sha256(["top1>=0.8"]) != section_sha256(["top1>=0.9"])


# -- the runner, on two fake stages ---------------------------------------------------------------------------------


class FakeStages:
    """`upstream` writes OUT/a.txt from its config; `gate` writes OUT/b.txt from a.txt and passes when a.txt
    holds `passing`. Counts how often each one ran."""

    def __init__(self, out: Path, upstream_config: dict, passing: str = "x"):
        self.out, self.passing, self.calls = out, passing, {"upstream": 0, "gate": 0}
        self.upstream_config = upstream_config

    def upstream(self):
        self.calls["upstream"] += 1
        (self.out / "a.txt").write_text(self.upstream_config["text"])
        return ["a.txt"], {}

    def gate(self):
        self.calls["gate"] += 1
        text = (self.out / "a.txt").read_text()
        (self.out / "b.txt").write_text(text.upper())
        passed = text == self.passing
        return ["b.txt"], {
            "passed": passed,
            "results": [{"expression": f"a=={self.passing}", "value": text, "passed": passed}],
        }

    def pipeline(self, force=False) -> tuple[Pipeline, list[str]]:
        lines: list[str] = []
        pipeline = Pipeline(PipelineConfig(), self.out, force, lines.append)
        pipeline.stages = [
            Stage("upstream", dict(self.upstream_config), lambda: [], self.upstream),
            Stage("gate", ["a==x"], lambda: ["a.txt"], self.gate),
        ]
        return pipeline, lines


@pytest.fixture
def fake(tmp_path):
    stages = FakeStages(tmp_path / "out", {"text": "x", "note": 1})
    assert stages.pipeline()[0].run() == 0
    return stages


def test_second_run_skips_every_stage_but_the_gate(fake):
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0
    assert fake.calls == {"upstream": 1, "gate": 2}
    assert lines[:2] == [
        "skip  upstream config, inputs and outputs unchanged",
        "run   gate     gates are evaluated on every run",
    ]
    assert lines[2] == "  pass  a==x  (value x)"


def test_state_file_records_config_inputs_and_outputs(fake):
    from okdpipe.files import file_sha256

    state = json.loads((fake.out / "pipeline.json").read_text())
    gate = state["stages"]["gate"]
    assert gate["config_sha256"] == section_sha256(["a==x"])
    assert gate["inputs"] == {"a.txt": file_sha256(fake.out / "a.txt")}
    assert gate["outputs"] == {"b.txt": file_sha256(fake.out / "b.txt")} and gate["passed"] is True
    assert not list(fake.out.glob(".pipeline.json.*"))  # the atomic write left no temp file


def test_changed_upstream_output_reruns_downstream(fake):
    fake.upstream_config["text"] = "y"
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 1  # the gate now fails: exit code 1
    assert fake.calls == {"upstream": 2, "gate": 2}
    assert lines[:2] == [
        "run   upstream its config section (upstream) changed",
        "run   gate     gates are evaluated on every run",
    ]
    assert (fake.out / "b.txt").read_text() == "Y"


def test_config_change_with_identical_output_leaves_downstream_skipped(fake):
    fake.upstream_config["note"] = 2  # reruns upstream, which writes the same bytes
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0
    assert fake.calls == {"upstream": 2, "gate": 2}
    assert lines[1] == "run   gate     gates are evaluated on every run"


def test_replaced_output_reruns_its_stage_only(fake):
    (fake.out / "b.txt").write_text("tampered")
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0 and fake.calls == {"upstream": 1, "gate": 2}
    assert lines[1] == "run   gate     gates are evaluated on every run"
    assert (fake.out / "b.txt").read_text() == "X"


@pytest.mark.parametrize("damage", ["replaced", "missing"])
def test_an_upstream_output_replaced_or_missing_reruns_that_stage(fake, damage):
    """A stage whose config and inputs are unchanged still runs when its recorded output is no longer the file it
    wrote: the gate would otherwise judge bytes no stage produced."""
    a = fake.out / "a.txt"
    a.write_text("tampered") if damage == "replaced" else a.unlink()
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0 and fake.calls == {"upstream": 2, "gate": 2}
    assert lines[0] == "run   upstream output a.txt is missing or was replaced"
    assert a.read_text() == "x"


def test_dry_run_plan_runs_nothing_and_marks_downstream(fake):
    fake.upstream_config["text"] = "y"
    pipeline, _ = fake.pipeline()
    plan = [describe(decision) for decision in pipeline.plan()]
    assert plan == [
        "run   upstream its config section (upstream) changed",
        "run   gate     gates are evaluated on every run",
    ]
    assert fake.calls == {"upstream": 1, "gate": 1} and (fake.out / "a.txt").read_text() == "x"


def test_force_reruns_everything(fake):
    pipeline, lines = fake.pipeline(force=True)
    assert [describe(d) for d in pipeline.plan()] == ["run   upstream --force", "run   gate     --force"]
    assert pipeline.run() == 0 and fake.calls == {"upstream": 2, "gate": 2}


def test_a_failed_stage_keeps_the_finished_ones(fake):
    fake.upstream_config["text"] = "y"
    pipeline, _ = fake.pipeline()
    pipeline.stages[1].run = lambda: (_ for _ in ()).throw(RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        pipeline.run()
    pipeline, lines = fake.pipeline()
    pipeline.run()
    assert lines[:2] == [
        "skip  upstream config, inputs and outputs unchanged",
        "run   gate     gates are evaluated on every run",
    ]


def test_a_verdict_edited_into_the_state_file_is_never_trusted(tmp_path):
    failing = FakeStages(tmp_path / "out", {"text": "x"}, passing="z")
    assert failing.pipeline()[0].run() == 1
    path = failing.out / "pipeline.json"
    state = json.loads(path.read_text())
    state["stages"]["gate"]["passed"] = True
    state["stages"]["gate"]["results"][0]["passed"] = True
    path.write_text(json.dumps(state))
    pipeline, lines = failing.pipeline()
    assert pipeline.run() == 1 and lines[-1].startswith("gate FAILED")


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.pop("config_sha256"),
        lambda r: r.update(inputs=[1, 2]),
        lambda r: r.update(outputs=None),
        lambda r: r.update(outputs={"a.txt": 5}),
    ],
)
def test_a_damaged_stage_record_reruns_that_stage(fake, damage):
    path = fake.out / "pipeline.json"
    state = json.loads(path.read_text())
    damage(state["stages"]["upstream"])
    path.write_text(json.dumps(state))
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0 and fake.calls == {"upstream": 2, "gate": 2}
    assert lines[0] == "run   upstream its record in pipeline.json is damaged"


def test_corrupt_state_file_names_the_fix(fake):
    (fake.out / "pipeline.json").write_text("{")
    with pytest.raises(Exception, match="pipeline.json: corrupt .*--force"):
        fake.pipeline()[0].run()
    assert fake.pipeline(force=True)[0].run() == 0


# -- distill: a killed run is resumed -------------------------------------------------------------------------------

TINY = dict(
    method="vanilla",
    arch="resnet8",
    students=2,
    dataset="synthetic",
    epochs=2,
    batch_size=8,
    lr=0.05,
    val_split=0.25,
    device="cpu",
)  # 48 training images -> 6 steps per epoch


def test_killed_distill_stage_is_resumed_not_restarted(tmp_path):
    out = tmp_path / "out"
    killed = fit(DistillConfig(**TINY), RunDir(out / "distill"), stop_after_steps=8, echo=lambda _: None)
    assert killed == {"stopped": True}
    first_epoch = RunDir(out / "distill").read_manifest()["epochs"][0]
    pipeline = Pipeline(PipelineConfig(distill=TINY), out, echo=lambda _: None)
    assert describe(pipeline.plan()[0]) == (
        "run   distill  no successful run recorded; resumes the killed run after epoch 1"
    )
    outputs, extra = pipeline.stages[0].run()
    manifest = RunDir(out / "distill").read_manifest()
    assert outputs == ["distill/checkpoints/last.pt"] and extra == {"resumed": True}
    assert manifest["status"] == "finished" and manifest["epochs"][0] == first_epoch  # epoch 1 was not retrained


def test_killed_run_with_other_settings_or_force_starts_afresh(tmp_path):
    out = tmp_path / "out"
    fit(DistillConfig(**TINY), RunDir(out / "distill"), stop_after_steps=8, echo=lambda _: None)
    changed = Pipeline(PipelineConfig(distill={**TINY, "lr": 0.02}), out, echo=lambda _: None)
    forced = Pipeline(PipelineConfig(distill=TINY), out, force=True, echo=lambda _: None)
    same_but_device = Pipeline(PipelineConfig(distill={**TINY, "device": "auto"}), out, echo=lambda _: None)
    assert changed.plan()[0].stage.note() == "trains from scratch"
    assert forced.plan()[0].stage.note() == "trains from scratch"
    assert same_but_device.resumable_epochs() == 1  # the device cannot change the weights


def test_state_file_has_a_format_header_and_version_1_still_reads(fake):
    path = fake.out / "pipeline.json"
    state = json.loads(path.read_text())
    assert (state["format"], state["format_version"]) == ("okdpipe-pipeline-state", 2)
    old = {"state_version": 1, **{k: v for k, v in state.items() if k not in ("format", "format_version")}}
    path.write_text(json.dumps(old))  # as okdpipe wrote it before the common header
    pipeline, lines = fake.pipeline()
    assert pipeline.run() == 0 and fake.calls == {"upstream": 1, "gate": 2}
    assert lines[:2] == [
        "skip  upstream config, inputs and outputs unchanged",
        "run   gate     gates are evaluated on every run",
    ]
    path.write_text(json.dumps({**state, "format_version": 3}))
    with pytest.raises(OkdpipeError, match="format_version 3 is not supported"):
        fake.pipeline()[0].run()


def test_a_second_pipeline_into_a_locked_out_is_refused_before_any_stage(fake):
    """Two pipelines into one OUT trained into one distill folder and deleted each other's exports: OUT is locked."""
    from okdpipe.locks import exclusive_lock
    from okdpipe.pipeline import LOCK_FILE

    fake.upstream_config["text"] = "y"  # the upstream stage would run
    pipeline, lines = fake.pipeline()
    with exclusive_lock(fake.out / LOCK_FILE, "held by this test"):
        with pytest.raises(OkdpipeError, match=f"another pipeline is writing {re.escape(str(fake.out))} \\(pid "):
            pipeline.run()
    assert fake.calls == {"upstream": 1, "gate": 1} and lines == []
    assert pipeline.run() == 1  # released: it runs (and its gate fails on "y")


def test_the_export_stage_leaves_the_earlier_export_to_export_itself(tmp_path, monkeypatch):
    """The export stage no longer empties OUT/export first: export replaces every earlier precision folder itself,
    all or nothing, so an export that fails (parity, a full disk, SIGTERM) keeps the earlier one."""
    import okdpipe.export.exporter as exporter

    out = tmp_path / "out"
    earlier = out / "export" / "fp32"
    earlier.mkdir(parents=True)
    (earlier / "model.onnx").write_bytes(b"earlier")

    def failing_export(model, out_dir, config):
        raise OkdpipeError("parity failed")

    monkeypatch.setattr(exporter, "export_model", failing_export)
    pipeline = Pipeline(PipelineConfig(), out, False, lambda line: None)
    with pytest.raises(OkdpipeError, match="parity failed"):
        pipeline._export()
    assert (earlier / "model.onnx").read_bytes() == b"earlier"
