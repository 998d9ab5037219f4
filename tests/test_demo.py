"""The whole pipeline, end to end, at the micro preset on a few hundred samples."""

import json

from nextmm import api
from nextmm.demo import run_demo

SMALL_RUN = [
    "data.counts={caption: 64, vqa: 8, video_qa: 6, binding: 8}",
    "clip.steps=4", "clip.time_budget_s=0", "pretrain.steps=6", "pretrain.time_budget_s=0", "pretrain.batch_size=8",
    "autoencoder.steps=3", "autoencoder.time_budget_s=0", "diffusion.steps=3", "diffusion.time_budget_s=0",
    "tune.steps=3", "tune.time_budget_s=0",
]


def test_demo_writes_model_metrics_and_report(tmp_path):
    result = run_demo(tmp_path, "micro", SMALL_RUN)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("caption_exact_match", "vqa_accuracy", "vqa_per_template", "video_direction_accuracy", "binding_4shot_accuracy",
                "t2i_1obj_all_objects_right", "t2i_2obj_all_objects_right", "reconstruction_all_objects_right", "total_s",
                "chat_before_accuracy", "chat_after_accuracy", "chat_after_per_turn", "tune_s"):
        assert key in metrics
    assert 0.0 <= metrics["vqa_accuracy"] <= 1.0
    assert set(metrics["vqa_per_template"]) == {"color", "shape", "size", "count", "count_shape", "exists"}
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 4 and page.count("data:image/png;base64") > 20  # stages 0, 1 and 2's two
    assert page.count('<div class="cell">') == 8 + 4  # drawings of 4 + 4 prompts, 4 reconstructions
    m = api.load(result["model"])
    assert m.config.preset == "micro" and m.tokenizer.vocab_size == m.config.llm.vocab_size
    assert m.decoder is not None and len(m.draw(["a large red circle"], steps=2)) == 1
    tuned = api.load(metrics["tuned_model"])  # instruction-tuned on conversations that stage 1 never read
    assert tuned.decoder is not None and json.loads((tmp_path / "tuned" / "tune" / "done.json").read_text())["step"] == 3
    assert (tmp_path / "conversations" / "conversation").is_dir() and not (tmp_path / "data" / "conversation").exists()
