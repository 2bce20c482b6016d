"""The studies' own arithmetic (studies/gem.py, plateau.py, runs.py, smollm2.py) against naive
recomputations: pass@k by enumerating every k-subset of the samples, distinct-n by counting n-grams
one by one, the plateau rule on sweeps built to stop at a known E, the count of self-play pairs
whose sample is the real answer against a direct count over the records, read from the iteration
that made each θ_t, and the tables' cells (mean ± sd over seeds, the value alone for one seed); for
studies/smollm2.py, the records salvaged from a cut JSON file, the held-out and self-play split
against transformers' own template and token counts, and the metrics of θ_t's samples."""
import itertools
import json
import os
import random
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "studies"))
import gem  # noqa: E402
import plateau  # noqa: E402
import runs  # noqa: E402
import study  # noqa: E402


@pytest.mark.parametrize("n", [5, 8, 16])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n):
    rng = random.Random(n)
    for _ in range(6):
        c = rng.randrange(n + 1)
        correct = set(rng.sample(range(n), c))
        for k in sorted({1, 2, n // 2, n}):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(i in correct for i in s) for s in subsets) / len(subsets)
            assert gem.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_distinct_n_counts_unique_word_ngrams_over_all_answers():
    rng = random.Random(0)
    words = ["a", "b", "c", "d", "17", "42"]
    for _ in range(20):
        answers = [" ".join(rng.choice(words) for _ in range(rng.randrange(0, 6))) for _ in range(16)]
        for n in (1, 2):
            seen, total = [], 0
            for a in answers:
                w = a.split()
                for i in range(len(w) - n + 1):
                    total += 1
                    if w[i:i + n] not in seen:
                        seen.append(w[i:i + n])
            assert gem.distinct_n(answers, n) == pytest.approx(len(seen) / total if total else 0.0, rel=1e-12, abs=0)


def sweep_rows(acc, logp, seeds=3, noise=0.002):
    """Summary rows of SFT runs per epoch count, seeds scattered around the given means."""
    rng = random.Random(1)
    out = {}
    for e, (a, l) in zip(sorted(acc), zip(acc.values(), logp.values())):
        out[e] = [[{"eval/accuracy": a + rng.uniform(-noise, noise),
                    "eval/heldout_logp_token": l + rng.uniform(-noise, noise)}] for _ in range(seeds)]
    return out


def test_plateau_is_the_first_epoch_count_after_which_neither_metric_improves():
    sweep = [4, 8, 16, 32, 64]
    # accuracy stops at 16; the log-likelihood still gains 0.05 from 16 to 32, so 16 is no plateau
    rows = sweep_rows(dict(zip(sweep, [0.0, 0.2, 0.5, 0.505, 0.50])),
                      dict(zip(sweep, [-2.0, -1.2, -0.8, -0.75, -0.76])))
    assert plateau.plateau(sweep, rows) == 32
    # both still rising at the end: no plateau within the sweep
    rows = sweep_rows(dict(zip(sweep, [0.0, 0.1, 0.2, 0.3, 0.4])),
                      dict(zip(sweep, [-2.0, -1.8, -1.6, -1.4, -1.2])))
    assert plateau.plateau(sweep, rows) is None
    # a falling log-likelihood with flat accuracy is a plateau where the fall begins
    rows = sweep_rows(dict(zip(sweep, [0.0, 0.3, 0.6, 0.605, 0.61])),
                      dict(zip(sweep, [-2.0, -1.0, -0.6, -0.7, -0.8])))
    assert plateau.plateau(sweep, rows) == 16


def test_identical_pairs_are_read_from_the_iteration_that_made_each_model(tmp_path):
    rng = random.Random(2)
    out = tmp_path / "run"
    iterations, expected = 3, [None]
    for t in range(iterations):
        records, same, total, K = [], 0, 0, rng.choice([1, 3])  # K is one per file, as the trainer writes it
        for i in range(rng.randrange(5, 15)):
            real = f"{i} + {t} = {i + t}"
            generated = [real if rng.random() < 0.4 else f"{i} + {t} = {i + t + rng.randrange(1, 9)}"
                         for _ in range(K)]
            same += generated.count(real)
            total += len(generated)
            records.append({"messages": [{"role": "user", "content": f"q{i}"}], "real": real, "generated": generated,
                            "ref_real": -rng.random(), "ref_generated": [-rng.random() for _ in generated],
                            "drawn_by": t})
        os.makedirs(out / f"iter_{t}")
        with open(out / f"iter_{t}" / "selfplay.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        expected.append(same / total)
    os.makedirs(out / f"iter_{iterations}")  # the last model trains on nothing more
    summary = [{"iteration": t, "eval/accuracy": rng.random()} for t in range(iterations + 1)]
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f)
    rows, spent = runs.train(str(out), ["never", "run"])
    assert spent == 0.0  # a finished run is read, not redone
    assert "samples/identical" not in rows[0]
    assert [r["samples/identical"] for r in rows[1:]] == pytest.approx(expected[1:])
    assert len({round(x, 9) for x in expected[1:]}) > 1  # the iterations differ, so an off-by-one shows


def test_table_cells_are_mean_and_sd_over_seeds_and_the_value_alone_for_one_seed():
    rng = random.Random(3)
    three = [rng.uniform(-3, 1) for _ in range(3)]
    mean = sum(three) / 3
    sd = (sum((x - mean) ** 2 for x in three) / 2) ** 0.5  # the sample standard deviation, n - 1
    assert runs.fmt(three, 3) == f"{mean:.3f} ± {sd:.3f}"
    assert runs.fmt([three[0], None], 3) == f"{three[0]:.3f}"  # a seed without the value does not count
    assert runs.fmt([None, None], 3) == "" and runs.fmt([], 2) == ""
    # study.py's tables go through the same cells: one seed shows no "± 0.000" spread
    rows = [{"eval/accuracy": 0.5}, {"eval/accuracy": 0.25, "eval/heldout_logp": -2.0,
                                     "rewards/real": 0.125, "rewards/generated": -0.5}]
    one = study.tabulate({name: [rows] for name in study.METHODS}, 1)
    assert "±" not in one and "| SPACE | 0.500 | 0.250 |" in one and "|  | -2.00 |" in one
    many = study.tabulate({name: [rows, rows] for name in study.METHODS}, 1)
    assert "| SPACE | 0.500 ± 0.000 | 0.250 ± 0.000 |" in many
    assert one.count("| method | θ_0 | θ_1 |") == 4  # the four metrics, each its table


# -----------------------------------------------------------------------------
# studies/smollm2.py: the salvage of the cut ShareGPT file, the held-out and self-play split, the
# metrics of θ_t's samples (the study itself needs ShareGPT and hours: never run here)

def _sharegpt_text(records):
    """records as ShareGPT's file lays them out (indent 2, non-ASCII kept) -> (text, end of each record)."""
    text, ends = "[\n", []
    for i, r in enumerate(records):
        text += ("" if i == 0 else ",\n") + json.dumps(r, indent=2, ensure_ascii=False)
        ends.append(len(text.encode("utf-8")))
    return text + "\n]", ends


def _random_record(rng, i):
    words = ["Grüße", "naïve", "日本語", "ok", "don't", "\"quoted\"", "{brace}", "a\\b", "émoji 🙂", "x"]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(1, 9)))  # noqa: E731
    turns = [{"from": ("human", "gpt")[k % 2], "value": say()} for k in range(rng.randrange(0, 5))]
    return {"id": f"rec{i}_0", "conversations": turns, "score": rng.random()}


def test_complete_records_keeps_exactly_the_records_before_a_cut(tmp_path):
    import smollm2
    rng = random.Random(0)
    records = [_random_record(rng, i) for i in range(12)]
    text, ends = _sharegpt_text(records)
    raw = text.encode("utf-8")
    whole, out = tmp_path / "whole.json", str(tmp_path / "out.json")
    whole.write_bytes(raw)
    smollm2.complete_records(str(whole), out)
    assert json.load(open(out, encoding="utf-8")) == records  # an uncut file: every record
    starts = [e - len(json.dumps(r, indent=2, ensure_ascii=False).encode("utf-8")) for r, e in zip(records, ends)]
    cuts = [starts[j] + rng.randrange(1, ends[j] - starts[j]) for j in range(len(records)) for _ in range(4)]
    cuts += [ends[3], ends[3] + 1]  # right after a record, and after its comma
    for cut in cuts:
        (tmp_path / "cut.json").write_bytes(raw[:cut])  # often inside a multi-byte character
        smollm2.complete_records(str(tmp_path / "cut.json"), out)
        expected = [r for r, e in zip(records, ends) if e <= cut]
        assert json.load(open(out, encoding="utf-8")) == expected, cut


def test_reply_metrics_against_a_count_reply_by_reply():
    import smollm2
    rng = random.Random(1)
    stops = {2, 7}
    for _ in range(20):
        n = rng.randrange(1, 9)
        out = [[rng.randrange(10, 50) for _ in range(rng.randrange(0, 6))] + rng.choice([[], [2], [7]])
               for _ in range(n)]
        reals = [rng.choice(["Yes.", "Sure, here it is:", "日本語 です"]) for _ in range(n)]
        replies = [rng.choice([y, y + " ", "Maybe, maybe not."]) for y in reals]
        got = smollm2.reply_metrics(out, replies, reals, stops)
        lengths, cut = [], 0
        for o in out:
            if o and o[-1] in stops:
                lengths.append(len(o) - 1)
            else:
                lengths.append(len(o))
                cut += 1
        assert got["gen/length"] == pytest.approx(sum(lengths) / n)
        assert got["gen/at_limit"] == pytest.approx(cut / n)
        assert got["gen/equal_real"] == pytest.approx(sum(a == b for a, b in zip(replies, reals)) / n)
        assert got["gen/distinct2"] == gem.distinct_n(replies, 2)


def test_split_keeps_what_fits_smollm2s_template_unduplicated_in_order(tmp_path, smollm2_tokenizer_dir):
    """The limits counted with transformers' own tokenizer and apply_chat_template (SmolLM2's default
    system prompt included), not the project's."""
    import smollm2
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    rng = random.Random(2)
    words = ["the", "Grüße", "naïve", "日本語", "code", "why", "é", "list", "of", "10"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    prompts = [say(rng.randrange(1, 30)) for _ in range(30)]
    chats = [{"messages": [{"role": "user", "content": rng.choice(prompts)},
                           {"role": "assistant", "content": say(rng.randrange(1, 25))}]} for _ in range(60)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    cfg = dict(n=5, heldout=4, max_prompt=90, max_response=40)
    examined, kept = smollm2.split(smollm2_tokenizer_dir, str(path), cfg, str(tmp_path / "data"))

    order = list(chats)
    random.Random(smollm2.SEED).shuffle(order)
    expected, seen, dropped = [], set(), {}
    for k, c in enumerate(order):
        if len(expected) == 9:
            break
        prompt = c["messages"][:1]
        head = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        whole = hf.apply_chat_template(c["messages"], tokenize=False)
        n_prompt = len(hf(head, add_special_tokens=False)["input_ids"])
        reply = hf(whole[len(head):], add_special_tokens=False)["input_ids"]
        n_reply = reply.index(hf.convert_tokens_to_ids("<|im_end|>")) + 1
        why = ("twice" if prompt[0]["content"] in seen else "prompt" if n_prompt > 90 else
               "reply" if n_reply > 40 else "")
        dropped[why] = dropped.get(why, 0) + 1
        if why:
            continue
        seen.add(prompt[0]["content"])
        expected.append(c)
    assert (examined, kept) == (k, 9)
    assert all(dropped.get(why) for why in ("twice", "prompt", "reply")), dropped  # each rule was at work
    read = lambda name: [json.loads(x) for x in open(tmp_path / "data" / name, encoding="utf-8")]  # noqa: E731
    assert read("heldout.jsonl") == expected[:4] and read("selfplay.jsonl") == expected[4:]
    with pytest.raises(SystemExit, match="only"):
        smollm2.split(smollm2_tokenizer_dir, str(path), dict(cfg, n=200), str(tmp_path / "data2"))
