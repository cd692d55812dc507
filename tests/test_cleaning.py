"""The teacher's cleaning filters (models/data/cleaning.py) on crafted rows, and what the teacher stage makes of them
(tasks/teacher.py's select, pass_rates and card: no model is loaded)."""
import pytest

from branchmerge.models.data import cleaning
from branchmerge.models.data.cleaning import FILTERS, clean, drop_reasons

GOOD = "3 * 5 = 15.\n<answer>15</answer>"


def row(completion=GOOD, id="p1", question="Solve the following multiplication: 3 * 5.", finished=True,
        answer="15"):
    return {"id": id, "domain": "d", "question": question, "completion": completion, "answer": answer,
            "score": 1.0, "finished": finished, "num_tokens": 12}


# Per filter: rows and, for each, whether the filter alone drops it (a row it must drop beside a close one it keeps)
CASES = {
    "truncated": [(row(finished=False), True), (row(), False)],
    "no_answer": [(row("3 * 5 = 15.", answer=None), True), (row("<answer>15", answer="15"), False)],
    "format": [
        (row("<answer>15</answer> <answer>15</answer>"), True),   # two blocks
        (row("<answer>15</answer> Done."), True),                  # text after </answer>
        (row("<answer> </answer> \\boxed{15}"), True),             # an empty block
        (row("3 * 5 = 15.\n<answer>15"), True),                    # never closed
        (row("3 * 5 = \\boxed{15}"), True),                        # no tags at all
        (row("<answer>15</answer><answer>"), True),                # a second, unclosed block
        (row(GOOD + "\n\n"), False),                               # whitespace after it is fine
        (row("3 * 5 = 15.\n<ANSWER>15</Answer>"), False),          # tags are case-insensitive (as extract_answer)
    ],
    "repetition": [
        (row("3 * 5 = 15. " * 6 + "<answer>15</answer>"), True),   # 31 words: 28 4-grams, 22 repeats
        (row("the the the the the the"), True),                    # 3 4-grams, 2 repeats
        (row("3 * 5 = 15. So 3 * 5 = 15. <answer>15</answer>"), False),  # 9 4-grams, 2 repeats
        (row("15 <answer>15</answer>"), False),                     # fewer than 4 words: no 4-gram, no judgement
    ],
    "duplicate": [
        (row(GOOD), False),
        (row(" 3 * 5 =  15.\n\n<answer>15</answer> "), True),      # the same text but for whitespace
        (row("3 * 5 = 15\n<answer>15</answer>"), False),           # another text (no period)
        (row(GOOD, id="p2"), False),                               # the same text for another prompt
    ],
    "near_duplicate_prompt": [
        (row(id="p1"), False),
        (row(id="p2", question="SOLVE  the following multiplication: 3 * 5."), True),  # case and spacing
        (row("<answer>15</answer>", id="p2", question="SOLVE  the following multiplication: 3 * 5."), True),
        (row(id="p3", question="Solve the following multiplication: 3 * 6."), False),  # another number
        (row(id="p4", question="Solve the following multiplication: 5 * 3."), False),  # the numbers in another order
        (row(id="p5", question="Solve the following multiplication: 3 + 5."), False),  # another operator
    ],
}


def test_every_filter_has_cases_and_a_rule():
    assert set(CASES) == set(FILTERS)
    for name in FILTERS:
        assert cleaning.rule(name) and "\n" not in cleaning.rule(name)


@pytest.mark.parametrize("name", list(CASES))
def test_filter_on_crafted_rows(name):
    rows, drops = zip(*CASES[name])
    reasons = drop_reasons(list(rows), [name])
    assert reasons == [name if d else None for d in drops], [r["completion"] for r in rows]
    kept, counts = clean(list(rows), [name])
    assert kept == [r for r, d in zip(rows, drops) if not d] and counts == {name: sum(drops)}


def test_repetition_threshold_is_more_than_half():
    # 11 words: 8 4-grams, 4 of them repeats = 0.5, not more: kept; one more repeated word tips it (5 of 9)
    assert not cleaning.repetition(row("a b c d a b c d a b c"))
    assert cleaning.repetition(row("a b c d a b c d a b c d"))


def test_near_duplicate_prompt_jaccard_threshold():
    q = "Find the Least Common Multiple (LCM) of these numbers: 12, 4, and give it as your final answer"
    same_numbers = q.replace("your final answer", "the final answer")  # 1 word of 22: 3 of 20 3-grams differ
    assert cleaning.jaccard(cleaning.shingles(q), cleaning.shingles(same_numbers)) < cleaning.NEAR_DUPLICATE_JACCARD
    assert drop_reasons([row(id="a", question=q), row(id="b", question=same_numbers)], ["near_duplicate_prompt"]) == [
        None, None]
    assert drop_reasons([row(id="a", question=q), row(id="b", question=q + "!")], ["near_duplicate_prompt"]) == [
        None, "near_duplicate_prompt"]


def test_set_filters_compare_only_with_rows_still_in_the_data():
    rows = [row(finished=False), row(GOOD + " "),                   # p1: the first response is truncated
            row(id="p2", finished=False),                            # p2 (p1's question) has nothing left ...
            row(id="p3", question="solve the following multiplication: 3 * 5.")]
    # ... so p1's second response is no duplicate and p3 is p1's near duplicate, not p2's
    assert drop_reasons(rows, ["truncated", "duplicate", "near_duplicate_prompt"]) == [
        "truncated", None, "truncated", "near_duplicate_prompt"]
    p1_gone = [row(finished=False), row(id="p3", question="solve the following multiplication: 3 * 5.")]
    assert drop_reasons(p1_gone, ["truncated", "near_duplicate_prompt"]) == ["truncated", None]


def test_the_first_filter_that_drops_a_row_counts_it():
    rows = [row("3 * 5 =", finished=False, answer=None),              # truncated and no answer
            row("3 * 5 = \\boxed{15}"),                             # wrong format only
            row(), row(GOOD)]                                        # fine, then its duplicate
    kept, counts = clean(rows, ["truncated", "no_answer", "format", "duplicate"])
    assert counts == {"truncated": 1, "no_answer": 0, "format": 1, "duplicate": 1} and kept == [rows[2]]
    kept_other, counts = clean(rows, ["no_answer", "truncated", "duplicate", "format"])
    assert counts == {"no_answer": 1, "truncated": 0, "duplicate": 1, "format": 1} and kept_other == kept
    assert list(counts) == ["no_answer", "truncated", "duplicate", "format"]  # the filters' order
    assert clean(rows, []) == (rows, {})


def test_unknown_or_repeated_filter_fails_naming_the_key_and_the_filters():
    from branchmerge.flows.config import compose
    from branchmerge.flows.schema import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["experiment=tiny", "teacher.clean=[truncated,truncation]"])
    assert "teacher.clean" in str(err.value) and "'truncation'" in str(err.value)
    assert all(name in str(err.value) for name in FILTERS)
    with pytest.raises(ConfigError, match=r"teacher\.clean: filters \['duplicate'\] are listed more than once"):
        compose(["experiment=tiny", "teacher.clean=[duplicate,no_answer,duplicate]"])
    with pytest.raises(ValueError, match=r"unknown filter\(s\) \['nope'\]"):
        clean([row()], ["nope"])


def test_the_config_names_the_registrys_filters():
    from branchmerge.models.lm.config import CLEAN_FILTERS

    assert CLEAN_FILTERS == tuple(FILTERS)


def test_config_default_runs_every_filter():
    from branchmerge.flows.config import compose

    assert compose([]).teacher.clean == list(FILTERS)
    assert compose(["teacher=qwen_coder"]).teacher.clean == list(FILTERS)


# ----------------------------------------------------------------------------- the teacher stage's rows and card

@pytest.fixture(scope="module")
def teacher_inputs():
    """Two gcd prompts and a near duplicate of the first (other id, same numbers), one lcm prompt; crafted samples."""
    from branchmerge.flows.config import compose
    from branchmerge.models.data import domains

    gcd = domains.build_items("gcd", [{"name": "gcd", "config": {"min_numbers": 2, "max_numbers": 2,
                                                                  "min_value": 2, "max_value": 20}}], 2, seed=0)
    lcm = domains.build_items("lcm", [{"name": "lcm", "config": {"min_numbers": 2, "max_numbers": 2,
                                                                  "min_value": 2, "max_value": 15}}], 1, seed=0)
    twin = gcd[0] | {"id": "gcd/gcd/twin", "question": gcd[0]["question"].upper()}
    items = [gcd[0], gcd[1], twin, lcm[0]]

    def c(text, finished=True):
        return {"text": text, "finished": finished, "num_tokens": len(text.split())}

    right = [f"<answer>{it['answer']}</answer>" for it in items]
    samples = [
        [c("x\n" + right[0]), c("x\n" + right[0] + " "), c(right[0], finished=False), c("<answer>999</answer>")],
        [c(right[1]), c(right[1] + " and more"), c("x " + right[1]), c("y " + right[1])],  # 3 clean, cap 2
        [c(f"{w} {right[2]}") for w in "abcd"],                                          # the twin: all dropped
        [c("z " * 10 + right[3]), c(right[3]), c("no tags " + items[3]["answer"]), c("<answer>0</answer>")],
    ]
    cfg = compose(["experiment=tiny"]).teacher.model_copy(update={"n": 4, "keep": "verified", "keep_per_prompt": 2,
                                                                  "clean": list(FILTERS)})
    conversations = [[{"role": "user", "content": it["question"]}] for it in items]
    return items, conversations, samples, cfg


def test_teacher_rows_counts_and_card(teacher_inputs):
    from branchmerge.tasks.teacher import card, pass_rates, select

    items, conversations, samples, cfg = teacher_inputs
    scored, kept = select(items, conversations, samples, cfg)
    assert len(scored) == 16 and [r["accepted"] for r in scored] == [
        True, True, True, False, True, True, True, True, True, True, True, True, True, True, False, False]
    assert [r["dropped_by"] for r in scored] == [
        None, "duplicate", "truncated", None,
        None, "format", None, None,
        *["near_duplicate_prompt"] * 4,
        "repetition", None, None, None]
    assert [(k["id"], k["completion"]) for k in kept] == [
        (items[0]["id"], samples[0][0]["text"]), (items[1]["id"], samples[1][0]["text"]),
        (items[1]["id"], samples[1][2]["text"]), (items[3]["id"], samples[3][1]["text"])]
    assert kept[0]["messages"] == conversations[0] and all(k["score"] == 1.0 for k in kept)

    stats = pass_rates(items, scored, kept, cfg.n, cfg.clean)
    dropped = {"truncated": 1, "no_answer": 0, "format": 1, "repetition": 1, "duplicate": 1,
               "near_duplicate_prompt": 4}
    assert {k: stats[k] for k in ("samples", "accepted", "dropped", "capped", "kept", "clean")} == {
        "samples": 16, "accepted": 13, "dropped": dropped, "capped": 1, "kept": 4, "clean": list(FILTERS)}
    assert stats["domains"]["gcd"] | {"pass@4": None, "sample_accuracy": None, "tagged": None} == {
        "pass@4": None, "sample_accuracy": None, "tagged": None, "samples": 12, "accepted": 11,
        "dropped": dropped | {"repetition": 0}, "capped": 1, "kept": 3}
    assert stats["domains"]["gcd"]["pass@4"] == 1.0 and stats["domains"]["gcd"]["sample_accuracy"] == 11 / 12
    assert stats["domains"]["lcm"]["dropped"]["repetition"] == 1 and stats["domains"]["lcm"]["kept"] == 1
    for counts in (stats, *stats["domains"].values()):  # every accepted response is accounted for once
        assert counts["accepted"] == sum(counts["dropped"].values()) + counts["capped"] + counts["kept"]

    sheet = card(stats, cfg, seed=7)
    assert sheet["data"] == "sft.jsonl" and sheet["counts"] == {
        "samples": 16, "accepted": 13, "dropped": dropped, "capped": 1, "kept": 4}
    assert sheet["domains"] == stats["domains"] and sheet["clean"] == list(FILTERS)
    assert list(sheet["filters"]) == list(FILTERS) and "0.9" in sheet["filters"]["near_duplicate_prompt"]
    assert sheet["thresholds"]["REPETITION_SHARE"] == 0.5
    assert sheet["settings"] == cfg.key() | {"seed": 7} and sheet["settings"]["clean"] == list(FILTERS)
    assert "openai" not in sheet["settings"]  # no server URL or key name


def test_no_filters_keeps_the_old_selection(teacher_inputs):
    """clean=[]: verified, then up to keep_per_prompt exact-distinct responses per prompt (what the stage did)."""
    from branchmerge.tasks.teacher import select

    items, conversations, samples, cfg = teacher_inputs
    scored, kept = select(items, conversations, samples, cfg.model_copy(update={"clean": []}))
    assert all(r["dropped_by"] is None for r in scored)
    assert [(k["id"], k["completion"]) for k in kept] == [
        (items[0]["id"], samples[0][0]["text"]), (items[0]["id"], samples[0][1]["text"]),
        (items[1]["id"], samples[1][0]["text"]), (items[1]["id"], samples[1][1]["text"]),
        (items[2]["id"], samples[2][0]["text"]), (items[2]["id"], samples[2][1]["text"]),
        (items[3]["id"], samples[3][0]["text"]), (items[3]["id"], samples[3][1]["text"])]


def test_teacher_build_writes_the_counts_and_the_card(teacher_inputs, tmp_path, monkeypatch):
    """The stage's build with a stand-in backend answering the crafted samples: samples.jsonl marks every row,
    pass_rates.json (the stage's meta) has the counts, sft.card.json sits beside sft.jsonl; DPO pairs still read."""
    from branchmerge.models.data.pairs import teacher_pairs
    from branchmerge.models.lm import backends
    from branchmerge.tasks import teacher
    from branchmerge.tasks.common import Job, read_json, read_jsonl, write_json, write_jsonl
    from branchmerge.tasks.store import ArtifactRef

    items, conversations, samples, cfg = teacher_inputs

    class Answers:
        def generate(self, convs, **sampling):
            assert sampling["n"] == cfg.n and len(convs) == len(items)
            return samples

    monkeypatch.setattr(backends, "open_backend", lambda *args, **kwargs: Answers())
    mix, out = tmp_path / "mix", tmp_path / "out"
    mix.mkdir(), out.mkdir()
    write_jsonl(mix / "train.jsonl", items)
    write_json(mix / "shots.json", {"gcd": [], "lcm": []})
    job = Job(stage="teacher", key="k", store=str(tmp_path / "store"), refresh=False,
              config={"teacher": cfg.model_dump(), "seed": 3},
              upstream={"mix": ArtifactRef(stage="mix", key="m", path=str(mix), digest="d")})
    meta = teacher.build(job, out)

    assert sorted(p.name for p in out.iterdir()) == ["pass_rates.json", "samples.jsonl", "sft.card.json", "sft.jsonl"]
    assert read_json(out / "pass_rates.json") == meta and meta["dropped"]["near_duplicate_prompt"] == 4
    assert read_json(out / "sft.card.json") == teacher.card(meta, cfg, 3)
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 16 and [r["dropped_by"] for r in rows].count(None) == 8
    assert len(read_jsonl(out / "sft.jsonl")) == meta["kept"] == 4
    prompts = {it["id"]: m for it, m in zip(items, conversations)}
    assert [p["id"] for p in teacher_pairs(rows, prompts, None)] == [items[0]["id"], items[3]["id"]]
