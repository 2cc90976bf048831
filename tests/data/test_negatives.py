"""Hard-negative generation: the validation rules, the offline rule backend, and the LLM client against a
local OpenAI-compatible server started here (retries, cache, rejected answers, the key kept secret)."""
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from degla_scale.data.negatives import LEXICON, RULES, TYPES, RuleBackend, negatives_for, validate
from degla_scale.data.synthetic import finetune_record

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind,negative,reason", [
    ("swap_adj", "a blue car beside a red truck", None),
    ("swap_adj", "a red car beside a red truck", "words_differ"),
    ("reshuffle", "a red car beside a blue truck", "same_as_positive"),
    ("reshuffle", "beside a blue truck a red car", None),
    ("replace_adj", "a green car beside a blue truck", None),
    ("replace_adj", "a green car beside a green truck", "not_one_word_replaced"),
    ("replace_noun", "a red car behind a blue truck", None),  # one content word changed, also for replace types
    ("replace_noun", "the red car beside a blue truck", "function_word_replaced"),
    ("replace_noun", "a red car beside a blue big truck", "not_one_word_replaced"),
    ("swap_noun", "", "empty"),
])
def test_validate(kind, negative, reason):
    assert validate(kind, "a red car beside a blue truck", negative) == reason


def test_rule_backend_makes_every_type_for_two_object_captions():
    backend = RuleBackend(seed=0)
    made = 0
    for index in range(40):
        record = finetune_record(seed=0, index=index, num_negatives=5)
        if " of " not in record["caption"] and "above" not in record["caption"] and "below" not in record["caption"]:
            continue  # single-object captions: only the replace types apply
        for kind in TYPES:
            negative = backend(kind, record["caption"])
            assert negative is not None and validate(kind, record["caption"], negative) is None, (kind, record["caption"])
            assert backend(kind, record["caption"]) == negative  # deterministic
            made += 1
    assert made >= 5 * 20


def test_rule_backend_keeps_adjectives_in_their_group_and_redraws_on_attempt():
    backend = RuleBackend(seed=0)
    assert backend("swap_adj", "a small red car") is None  # a size never trades places with a colour
    assert backend("swap_adj", "a small red car and a large blue truck") in (
        "a large red car and a small blue truck", "a small blue car and a large red truck")
    assert backend("replace_adj", "two dogs on a bench").split()[0] in LEXICON.counts
    redrawn = {backend("replace_noun", "a red car", attempt) for attempt in range(6)}
    assert len(redrawn) > 1 and all(validate("replace_noun", "a red car", n) is None for n in redrawn)


def test_negatives_for_repeats_types_only_when_k_exceeds_the_applicable_ones():
    accepted, rejected, not_applicable = negatives_for(RuleBackend(seed=0), "r0", "a small red car", 4, TYPES, seed=0,
                                                       rounds=8)
    assert len({n for _, n in accepted}) == 4  # only the two replace types apply
    assert sorted(not_applicable) == ["reshuffle", "swap_adj", "swap_noun"]
    assert sorted({t for t, _ in accepted}) == ["replace_adj", "replace_noun"]
    accepted, _, _ = negatives_for(RuleBackend(seed=0), "r1", "a small red car left of a large blue bus", 4, TYPES, seed=0)
    assert len({t for t, _ in accepted}) == 4



def test_rule_backend_cli_lists_the_captions_short_of_k_and_why(tmp_path):
    """Captions the lexicon cannot fully rewrite: listed in OUT.short.jsonl with the reason, counted in the
    report and in one line on stderr; exit 0, or 1 with --strict."""
    captions = {"full": "a red car left of a blue truck", "few": "a dog on a bench", "none": "a photo of something"}
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"id": i, "caption": c}) for i, c in captions.items()))
    out = tmp_path / "neg.jsonl"
    command = [sys.executable, str(ROOT / "launch/make_negatives.py"), "--in", str(tmp_path / "captions.jsonl"),
               "--out", str(out), "--backend", "rule", "--num-negatives", "4"]
    lenient = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    strict = subprocess.run(command + ["--strict"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (lenient.returncode, strict.returncode) == (0, 1), lenient.stderr[-2000:]
    for run in (lenient, strict):
        assert json.loads(run.stdout.strip().splitlines()[-1])["short_captions"] == 2
        assert run.stderr.strip().splitlines()[-1] == (
            f"2 of 3 captions got fewer than 4 negatives (listed in {out.with_suffix('.short.jsonl')}): the rule backend "
            "knows only the words of its lexicon; use --backend llm, lower --num-negatives, or let make_shards.py drop them")
    short = {r["id"]: r for r in map(json.loads, out.with_suffix(".short.jsonl").read_text().splitlines())}
    assert short.keys() == {"few", "none"}
    assert {k: short["none"][k] for k in ("caption", "got", "needed")} == {"caption": captions["none"], "got": 0, "needed": 4}
    assert sorted(short["none"]["why"].removeprefix("not applicable: ").split(", ")) == sorted(TYPES)
    few = short["few"]  # no adjective nor known relation; its one noun swap comes back as a duplicate
    assert few["got"] == 3 and few["needed"] == 4
    assert all(t in few["why"] for t in ("reshuffle", "swap_adj", "replace_adj")) and "(duplicate)" in few["why"]


class FakeEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions: answers with the rule backend; the first request for a "flaky" caption gets a
    503 (the client must retry); replace_noun answers for "a dog on a bench" are wrong on purpose."""

    calls, auth, lock, failed = [], set(), threading.Lock(), set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        kind = next(k for k, rule in RULES.items() if rule in system)
        caption = user.rsplit("Caption: ", 1)[1].split("\nRewrite:")[0]
        with self.lock:
            type(self).calls.append((kind, caption))
            type(self).auth.add(self.headers.get("Authorization"))
            first_flaky = "flaky" in caption and caption not in self.failed
            self.failed.add(caption)
        if first_flaky:
            self.send_response(503)
            self.end_headers()
            return
        answer = RuleBackend(seed=0)(kind, caption) or caption
        if kind == "replace_noun" and caption == "a dog on a bench":
            answer = "a cat on a sofa"  # two words changed: must be rejected
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"Rewrite: {answer}"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_client_retries_caches_validates_and_keeps_the_key_secret(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    captions = ["a red car left of a blue truck", "a small dog above a large cat", "a dog on a bench",
                "a flaky green ball right of a yellow kite"]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"id": f"c{i}", "caption": c}) for i, c in enumerate(captions)))
    secret = "sk-test-do-not-print-0123456789"
    command = [sys.executable, str(ROOT / "launch/make_negatives.py"), "--in", str(tmp_path / "captions.jsonl"),
               "--out", str(tmp_path / "neg.jsonl"), "--backend", "llm", "--url", f"http://127.0.0.1:{server.server_port}/v1",
               "--model", "fake", "--num-negatives", "2", "--api-key-env", "TEST_KEY", "--concurrency", "4"]
    env = {**__import__("os").environ, "TEST_KEY": secret}
    try:
        first = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr[-2000:]
        asked = len(FakeEndpoint.calls)
        second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr[-2000:]
    finally:
        server.shutdown()
    assert len(FakeEndpoint.calls) == asked, "the rerun must answer from the cache"
    assert FakeEndpoint.auth == {f"Bearer {secret}"}
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["asked"] == asked - 1  # the 503 was retried by the client, not counted as an answer
    assert json.loads(second.stdout.strip().splitlines()[-1])["asked"] == 0
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "neg.jsonl").read_text().splitlines())}
    for i, caption in enumerate(captions):
        # "a dog on a bench" has no adjective nor known relation: swap_noun, and a wrong replace_noun answer
        assert len(out[f"c{i}"]["negatives"]) == (1 if i == 2 else 2)
        for kind, negative in zip(out[f"c{i}"]["types"], out[f"c{i}"]["negatives"]):
            assert validate(kind, caption, negative) is None
    rejects = [json.loads(line) for line in (tmp_path / "neg.rejects.jsonl").read_text().splitlines()]
    assert {"id": "c2", "type": "replace_noun", "answer": "a cat on a sofa", "reason": "not_one_word_replaced"} in rejects
    assert report["short_captions"] == 1 and report["rejected_not_one_word_replaced"] >= 1
    (short,) = map(json.loads, (tmp_path / "neg.short.jsonl").read_text().splitlines())
    assert short["id"] == "c2" and "replace_noun 'a cat on a sofa' (not_one_word_replaced)" in short["why"]
    for text in (first.stdout, first.stderr, second.stdout, second.stderr,
                 *(p.read_text() for p in tmp_path.glob("neg*.jsonl"))):
        assert secret not in text
