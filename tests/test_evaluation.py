"""gemmakit.evaluation.core: perplexity and multiple-choice scoring against transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.evaluation import core as ev

SHIPPED = ("arc_style", "hellaswag_style", "mmlu_style", "piqa_style")


# --- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,context,stride", [(1, 2, 1), (10, 4, 3), (50, 16, 5), (300, 128, 64), (127, 128, 127)]
)
def test_strided_windows_predict_each_token_once(n, context, stride):
    windows = ev.strided_windows(n, context, stride)
    predicted = [k for begin, end, first in windows for k in range(first, end)]
    assert predicted == list(range(n))
    for begin, end, first in windows:
        assert 1 + end - begin <= context  # <bos> + text fits the window
        assert begin <= first < end
        assert 1 + first - begin <= context - stride or begin == 0  # left context, <bos> included


def test_strided_windows_reject_bad_numbers():
    with pytest.raises(GemmakitError, match="at least 2"):
        ev.strided_windows(10, 1, 1)
    with pytest.raises(GemmakitError, match="between 1 and context - 1 = 7"):
        ev.strided_windows(10, 8, 8)


def hf_strided_nll(hf_model, ids: list[int], bos: int, context: int, stride: int) -> tuple[float, int]:
    """The HF guide's strided loop, written out, with a <bos> at the head of each window."""
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context - 1, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([[bos] + ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=labels).loss  # mean over trg_len targets
        nll_sum += loss.item() * trg_len
        count += trg_len
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / count, count


def test_perplexity_matches_transformers_on_bundled(bundled, hf_bundled):
    hf_model, _ = hf_bundled
    text = ev.DEFAULT_TEXT.read_text()
    # 130 tokens in windows of 96 advancing 48: two windows, the second predicting 35 tokens
    # with 48 tokens + <bos> of left context.
    ids = bundled.tokenizer.encode(text, add_bos=False)[:130]
    assert ids[0] != bundled.tokenizer.bos_id
    ours = ev.perplexity(bundled.model, ids, bundled.tokenizer.bos_id, context=96, stride=48)
    ref_nll, ref_count = hf_strided_nll(hf_model, ids, bundled.tokenizer.bos_id, 96, 48)
    print(
        f"bundled: ours ppl {ours.perplexity:.5f}, transformers {math.exp(ref_nll):.5f} ({ours.tokens} tokens)"
    )
    assert ours.tokens == ref_count == 130
    assert ours.windows == 2
    assert abs(ours.perplexity / math.exp(ref_nll) - 1) < 1e-3
    assert 2 < ours.perplexity < 200  # a real model on English prose, with <bos>


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_perplexity_matches_transformers_on_tiny_model(family, hf_folder):
    from gemmakit.loading import load_model, resolve

    folder, hf_model = hf_folder(family)
    model = load_model(resolve(folder), torch.float32, "cpu")
    ids = torch.randint(3, 256, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = ev.perplexity(model, ids, bos_id=2, context=16, stride=5)
    ref_nll, ref_count = hf_strided_nll(hf_model, ids, 2, 16, 5)
    assert ours.tokens == ref_count == 50
    assert abs(ours.perplexity / math.exp(ref_nll) - 1) < 1e-3
    assert ours.nll == pytest.approx(ref_nll, rel=1e-5)
    # A leading <bos> in the ids is the windows' own, not a token to predict.
    again = ev.perplexity(model, [2] + ids, bos_id=2, context=16, stride=5)
    assert again.tokens == 50 and again.nll == pytest.approx(ours.nll, rel=1e-6)
    # Windows batched together (the default) = one window per forward pass.
    single = ev.perplexity(model, ids, bos_id=2, context=16, stride=5, batch_tokens=1)
    assert ours.windows == single.windows == 8 and single.nll == pytest.approx(ours.nll, rel=1e-5)


def test_perplexity_chunks_do_not_change_the_result(hf_folder):
    from gemmakit.loading import load_model, resolve

    folder, _ = hf_folder("gemma3")
    model = load_model(resolve(folder), torch.float32, "cpu")
    hidden = model.hidden_states(torch.randint(0, 256, (1, 30)))[0]
    targets = torch.randint(0, 256, (30,))
    whole, greedy = ev.target_logprobs(model, hidden, targets, chunk=1000)
    pieces, greedy_pieces = ev.target_logprobs(model, hidden, targets, chunk=7)
    reference = torch.log_softmax(model.logits(hidden).double(), -1)[torch.arange(30), targets]
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(pieces, whole)
    assert torch.equal(greedy, greedy_pieces)


def test_perplexity_rejects_empty_text_and_long_context(bundled):
    with pytest.raises(GemmakitError, match="no tokens"):
        ev.perplexity(bundled.model, [bundled.tokenizer.bos_id], bundled.tokenizer.bos_id)
    with pytest.raises(GemmakitError, match="exceeds the model's"):
        ev.perplexity(bundled.model, [5, 6], bundled.tokenizer.bos_id, context=10**6)


# --- task files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_tasks_load(name):
    task = ev.load_task(ev.task_path(name))
    assert task.layout == name.removesuffix("_style")
    assert len(task.questions) >= 30
    assert len({q.text for q in task.questions}) == len(task.questions)
    for q in task.questions:
        assert 0 <= q.label < len(q.choices)
        assert len(set(q.choices)) == len(q.choices)
    # The gold answers are spread over the positions, so a positional bias cannot score high.
    counts = [sum(q.label == k for q in task.questions) for k in range(len(task.questions[0].choices))]
    assert max(counts) <= len(task.questions) // len(counts) + 2


def test_list_tasks_names_every_shipped_file():
    listed = {t["name"]: t for t in ev.list_tasks()}
    assert set(SHIPPED) <= set(listed)
    assert listed["arc_style"]["layout"] == "arc" and listed["arc_style"]["questions"] == 40


def test_unknown_task_name_lists_the_shipped_ones():
    with pytest.raises(GemmakitError, match="no shipped task 'arc'.*arc_style"):
        ev.task_path("arc")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ARC = {
    "question": "Q?",
    "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}


def test_layouts_are_detected_and_parsed(tmp_path):
    rows = {
        "hellaswag": {"ctx": "He opens the door and", "endings": ["walks in.", "flies."], "label": "1",
                      "activity_label": "Doors"},
        "arc": ARC,
        "mmlu": {"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B", "subject": "math"},
        "piqa": {"goal": "To dry a cup,", "sol1": "wipe it.", "sol2": "wet it.", "label": 0},
    }  # fmt: skip
    parsed = {k: ev.load_task(write_jsonl(tmp_path / f"{k}.jsonl", [r])) for k, r in rows.items()}
    assert {k: t.layout for k, t in parsed.items()} == {k: k for k in rows}
    hs, arc, mmlu, piqa = (parsed[k].questions[0] for k in ("hellaswag", "arc", "mmlu", "piqa"))
    assert (hs.text, hs.choices, hs.label) == ("Doors: He opens the door and", ["walks in.", "flies."], 1)
    assert (arc.text, arc.label) == ("Question: Q?\nAnswer:", 1)
    assert (mmlu.text, mmlu.choices, mmlu.label) == ("2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", list("ABCD"), 1)
    assert (piqa.text, piqa.choices, piqa.label) == (
        "Question: To dry a cup,\nAnswer:",
        ["wipe it.", "wet it."],
        0,
    )
    listed = ev.load_task(
        write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["x", "y", "z"], "answer": 2}])
    )
    assert listed.layout == "mmlu" and listed.questions[0].label == 2


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "bad.jsonl: no questions"),
        (["", "   "], "bad.jsonl: no questions"),
        ([ARC, ARC, "{not json"], r"bad.jsonl:3: not valid JSON"),
        ([ARC, "[1, 2]"], "bad.jsonl:2: expected a JSON object"),
        ([{"prompt": "x", "completion": "y"}], r"bad.jsonl:1: unknown layout \(keys: completion, prompt\)"),
        ([ARC] * 6 + [{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 5}],
         "bad.jsonl:7: hellaswag layout, but line 1 is arc"),
        ([{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 5}], "bad.jsonl:1: label 5 out of range for 4 choices"),
        ([{**ARC, "answerKey": "E"}], "bad.jsonl:1: answerKey 'E' is not one of the choice labels A, B, C, D"),
        ([{"question": "q", "choices": ["x", "y"], "answer": "C"}], "bad.jsonl:1: answer 'C' out of range for 2 choices"),
        ([{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}], "bad.jsonl:1: label 2 out of range for 2 choices"),
        ([{"goal": "g", "sol1": "", "sol2": "b", "label": 0}], "bad.jsonl:1: 'sol1' must be a non-empty string"),
        ([{"ctx": "c", "endings": ["only"], "label": 0}], "bad.jsonl:1: 'endings' must be a list of at least 2"),
        ([{"ctx": "c", "endings": ["a", "b"], "label": None}], "bad.jsonl:1: label must be an index, got None"),
    ],
)  # fmt: skip
def test_bad_task_files_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(GemmakitError, match=message):
        ev.load_task(path, where="bad.jsonl")


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(GemmakitError, match="no such file"):
        ev.load_task(tmp_path / "absent.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"goal": "caf\xe9"}\n')
    with pytest.raises(GemmakitError, match="not UTF-8"):
        ev.load_task(tmp_path / "latin.jsonl")


def test_fewshot_context_is_deterministic_and_excludes_the_question():
    task = ev.load_task(ev.task_path("arc_style"))
    a = ev.build_context(task, 5, fewshot=3, seed=1)
    assert a == ev.build_context(task, 5, fewshot=3, seed=1)
    assert a != ev.build_context(task, 5, fewshot=3, seed=2)
    blocks = a.split("\n\n")
    assert len(blocks) == 4 and blocks[-1] == task.questions[5].text
    for block in blocks[:3]:
        shot = next(q for q in task.questions if block.startswith(q.text))
        assert shot is not task.questions[5]
        assert block == shot.text + " " + shot.choices[shot.label]  # solved with the gold choice
    assert ev.build_context(task, 5) == task.questions[5].text
    with pytest.raises(GemmakitError, match="only 39 other questions"):
        ev.build_context(task, 0, fewshot=40)


def test_mmlu_subject_description():
    task = ev.load_task(ev.task_path("mmlu_style"))
    context = ev.build_context(task, 0, fewshot=1)
    assert context.startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    )
    assert context.endswith("\nD. 48\nAnswer:")


# --- scoring ---------------------------------------------------------------------------------


def test_encode_pair_splits_running_text(bundled):
    tok = bundled.tokenizer
    ctx, cont = ev.encode_pair(tok, "Question: What is red?\nAnswer:", " a tomato")
    assert ctx[0] == tok.bos_id and tok.bos_id not in ctx[1:] + cont
    assert ctx + cont == tok.encode("Question: What is red?\nAnswer: a tomato")
    assert tok.decode(cont) == " a tomato"
    # A trailing space of the context belongs to the continuation (lm-eval's rule).
    assert ev.encode_pair(tok, "Answer: ", "a tomato") == ev.encode_pair(tok, "Answer:", " a tomato")


def test_batched_scores_match_transformers_and_unbatched(bundled, hf_bundled):
    hf_model, _ = hf_bundled
    tok = bundled.tokenizer
    task = ev.load_task(ev.task_path("piqa_style"))
    pairs = [ev.encode_pair(tok, q.text, " " + c) for q in task.questions[:2] for c in q.choices]
    batched = ev.score_continuations(bundled.model, pairs, tok.pad_id, batch_tokens=4096)
    single = ev.score_continuations(bundled.model, pairs, tok.pad_id, batch_tokens=1)
    for (ctx, cont), (ll, greedy), (ll1, greedy1) in zip(pairs, batched, single):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1]
        ref = logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
        assert ll == pytest.approx(ref, abs=2e-3)
        assert ll1 == pytest.approx(ll, abs=1e-3)
        assert greedy == greedy1 == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_evaluate_choice_on_bundled(bundled):
    task = ev.load_task(ev.task_path("arc_style"))
    r = ev.evaluate_choice(bundled, task, limit=2)
    assert r.n == 2 and len(r.samples) == 2
    assert 0 <= r.acc <= 1 and 0 <= r.acc_norm <= 1
    for s, q in zip(r.samples, task.questions):
        assert len(s["loglikelihoods"]) == len(q.choices) and all(ll < 0 for ll in s["loglikelihoods"])
        assert s["pred"] == max(range(len(q.choices)), key=lambda j: s["loglikelihoods"][j])
        normed = [ll / len(c) for ll, c in zip(s["loglikelihoods"], q.choices)]
        assert s["pred_norm"] == normed.index(max(normed))
    assert r.acc == sum(s["pred"] == s["label"] for s in r.samples) / 2


def test_scoring_rule_states_the_method():
    rule = ev.scoring_rule(["arc", "piqa"], fewshot=2, seed=7)
    assert "ln p(c_j | <bos>, context" in rule and "float32" in rule
    assert "len(choice text)" in rule and "characters" in rule
    assert "random.Random(7" in rule
    assert 'prompt (arc): "Question: {question}\\nAnswer:"' in rule and "prompt (piqa)" in rule


def test_settings_are_the_cartesian_product():
    s = ev.settings(["a.gguf", "b"], None, ["none", "nf4"])
    assert [(x.model, x.adapter, x.quantize) for x in s] == [
        ("a.gguf", None, None), ("a.gguf", None, "nf4"), ("b", None, None), ("b", None, "nf4"),
    ]  # fmt: skip
    assert ev.settings(None, None, None) == [ev.Setting()]
    assert ev.Setting(None, "/x/my-adapter", "int8").label == "bundled +my-adapter int8"


def test_missing_quantization_module_is_a_clear_error(monkeypatch):
    real = ev.importlib.util.find_spec
    monkeypatch.setattr(ev.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemmakit.quant" else real(name, *a))  # fmt: skip
    with pytest.raises(GemmakitError, match="--quantize needs gemmakit.quant"):
        ev.load_setting(ev.Setting(quantize="nf4"))


def test_format_table_aligns_numbers_right():
    table = ev.format_table(("name", "value"), [("a", "1.5"), ("long name", "10.25")])
    lines = table.splitlines()
    assert lines[0].startswith("name") and lines[2].endswith("  1.5") and lines[3].endswith("10.25")


# --- lm-evaluation-harness adapter (optional extra) ------------------------------------------

TINY_TASK = """\
task: gemmakit_tiny_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def lm_eval_offline(monkeypatch, tmp_path):
    # Set before `datasets` is first imported: it reads these once.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    return pytest.importorskip("lm_eval")


def test_lm_eval_runs_a_local_task_like_gemmakit(lm_eval_offline, bundled, tmp_path):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from gemmakit.evaluation.lm_eval_adapter import GemmakitLM

    assert get_model("gemmakit") is GemmakitLM
    rows = ev.TASKS_DIR.joinpath("piqa_style.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "tiny_piqa.jsonl"
    data.write_text("\n".join(rows) + "\n")
    (tmp_path / "tiny_piqa.yaml").write_text(TINY_TASK.format(data=data))
    out = lm_eval_offline.simple_evaluate(
        model=GemmakitLM(loaded=bundled), tasks=["gemmakit_tiny_piqa"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )  # fmt: skip
    theirs = out["results"]["gemmakit_tiny_piqa"]
    ours = ev.evaluate_choice(bundled, ev.load_task(data))
    # lm-eval's prompt, tokenization and acc/acc_norm over our loglikelihoods = gemmakit's own.
    assert theirs["acc,none"] == pytest.approx(ours.acc)
    assert theirs["acc_norm,none"] == pytest.approx(ours.acc_norm)


def test_lm_eval_rolling_and_generation(lm_eval_offline, bundled):
    from lm_eval.api.instance import Instance

    from gemmakit import SamplingParams
    from gemmakit.evaluation.lm_eval_adapter import GemmakitLM
    from gemmakit.inference.api import LLM

    lm = GemmakitLM(loaded=bundled, max_length=16, stride=8)
    text = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = bundled.tokenizer.encode(text, add_bos=False)
    nll, count, windows = ev.sequence_nll(bundled.model, ids, bundled.tokenizer.bos_id, 16, 8)
    assert windows > 1 and count == len(ids)
    assert rolling == pytest.approx(-nll) and rolling < 0
    (generated,) = lm.generate_until(
        [Instance("generate_until", {}, ("The capital of France is", {"until": ["."], "max_gen_toks": 6}), 0)]
    )
    reference = LLM(loaded=bundled).generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=6)
    )
    assert generated == reference[0].outputs[0].text.split(".")[0]
