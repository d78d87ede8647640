"""The user's path through the editions (DESIGN.md section 1), one checkpoint all the way:

CE trains from scratch on one file -> EE continues the same model with DistributedTrainer (same arguments)
-> EE compresses it to INT8 behind the accuracy gate -> core's engine serves the INT8 checkpoint -> CNE
renders its Knative service with a GPU kind chosen from the checkpoint's config.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-c]*.py"))[:12])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_ce_to_ee_to_int8_to_serving(corpus, tmp_path):
    import deepseek_ce
    import deepseek_ee
    from deepseek_cne.gpu import choose_gpu
    from deepseek_cne.knative import ServiceSpec, render_service
    from deepseek_core import ModelConfig, load_model
    from deepseek_core.engine import LLM, SamplingParams
    from deepseek_ee.compression import compress_checkpoint

    # The editions re-export one Model class, so a model moves between them unchanged.
    assert deepseek_ce.Model is deepseek_ee.Model
    assert deepseek_ce.TrainingConfig is deepseek_ee.TrainingConfig

    tokenizer = deepseek_ce.train_tokenizer(corpus, vocab_size=512, output_dir=tmp_path / "tok")
    model = deepseek_ce.Model.from_config(
        "deepseek-tiny",
        tokenizer=tokenizer,
        seed=0,
        vocab_size=tokenizer.vocab_size,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    args = dict(
        train_data=str(corpus),
        config=deepseek_ce.TrainingConfig(
            max_steps=40,
            batch_size=8,
            seq_len=64,
            learning_rate=3e-3,
            warmup_steps=5,
            eval_every=0,
            save_every=0,
            progress_bar=False,
            log_every=20,
        ),
    )
    ce_result = deepseek_ce.Trainer(model=model, output_dir=tmp_path / "ce", **args).fit()
    assert ce_result.eval_loss is not None and ce_result.steps == 40
    model.save_pretrained(tmp_path / "ce-model")

    # CE -> EE: the same model and arguments, plus the cluster shape.
    resumed = deepseek_ee.Model.from_pretrained(tmp_path / "ce-model", device="cpu")
    ee = deepseek_ee.DistributedTrainer(
        model=resumed,
        output_dir=tmp_path / "ee",
        num_nodes=1,
        gpus_per_node=1,
        accelerator="cpu",
        tracking=False,
        **{**args, "config": args["config"].replace(max_steps=20)},
    )
    ee_result = ee.fit()
    assert ee_result.steps > 0
    final = tmp_path / "ee" / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert ee_result.eval_loss is None or ee_result.eval_loss < ce_result.eval_loss * 1.05

    # EE compression behind the gate, on held-out text the model never trained on.
    heldout = tmp_path / "heldout.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    heldout.write_text((stdlib / "json" / "decoder.py").read_text(encoding="utf-8"), encoding="utf-8")
    report = compress_checkpoint(
        final, tmp_path / "int8", method="weight_only", eval_data=heldout, max_loss=0.02
    )
    assert report.passed and report.written, report
    assert abs(report.relative_change) < 0.02

    # Core serves the INT8 checkpoint through the engine, deterministic under greedy decoding.
    llm = LLM(str(tmp_path / "int8"))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    first, second = llm.generate(["def main(", "import os\n"], params)
    assert first.completion_tokens == 12 or first.finish_reason == "stop"
    assert llm.generate(["def main("], params)[0].token_ids == first.token_ids
    assert load_model(tmp_path / "int8").config.vocab_size == tokenizer.vocab_size

    # CNE: a Knative service for the float checkpoint, GPU kind from its memory estimate.
    config = ModelConfig.from_pretrained(final)
    choice = choose_gpu(config, "bfloat16")
    assert choice.count >= 1 and choice.memory_needed_bytes > config.memory_bytes("bfloat16")
    spec = ServiceSpec(name="journey", model=str(final), image="deepseek-cne:0.1.0", gpu=choice)
    rendered = yaml.safe_dump(render_service(spec))
    assert "name: journey" in rendered and "autoscaling.knative.dev/min-scale" in rendered
