"""lmlab serve through the real `openai` client on 127.0.0.1: greedy completions and chat completions equal
`generate` (stories260K and the embedded SmolLM2, fp32), also 8 requests in flight; streamed chunks
concatenate to the non-streamed text; per-request adapters; speculative decoding inside the batch; every
bad request gets its 400 and the server keeps serving; the queue limit answers 503; a disconnected stream
frees its slot; the time limit; the API key; the real `lmlab serve` command."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from lmlab.adapters.files import save_adapter
from lmlab.adapters.lora import LoRAConfig, add_adapter, set_active_adapter
from lmlab.generation.generate import GenerationConfig, encode_prompt, generate
from lmlab.generation.sampling import SamplingConfig
from lmlab.generation.speculative import DraftModel, PromptLookup
from lmlab.paths import REPO_ROOT
from lmlab.serve import engine as engine_module
from lmlab.serve.app import Served, create_app
from lmlab.serve.engine import Engine, EngineConfig
from lmlab.tokenization import decode_continuation
from lmlab.weights.loading import load_model

GREEDY = SamplingConfig(temperature=0)
PROMPTS = ["Once upon a time", "Lily and Ben went to the park.", "The cat", "One day, a little girl named Sue",
           "Tom had a big red ball. He", "The sun was", "Mom said", "A bird sat on a tree and"]


@pytest.fixture(scope="module")
def stories(shared_data):
    loaded = load_model(shared_data / "stories260K" / "stories260K.bin", dtype="fp32")
    return loaded.model, loaded.tokenizer


@contextmanager
def running(model, tokenizer, *, adapters=(), api_key=None, drafter=None, **engine_kw):
    """An in-process server on a free port of 127.0.0.1 (a socket bound before uvicorn starts: no race)."""
    engine = Engine(model, tokenizer, EngineConfig(**{"context": 256, **engine_kw}), drafter=drafter).start()
    app = create_app(Served(engine, tokenizer, "base", list(adapters), api_key))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def in_flight(fn, items) -> list:
    """fn over items, all requests at once."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def reference(model, tok, prompts, max_new=40, chat=False, stop=(), seed=None, sampling=GREEDY) -> list[str]:
    cfg = GenerationConfig(max_new, sampling, stop_strings=tuple(stop), seed=seed)
    return [generate(model, tok, [p], cfg, chat=chat)[0] for p in prompts]


def stream_text(c: openai.OpenAI, **kw) -> tuple[str, str]:
    text, reason = "", None
    for chunk in c.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            text += choice.text
            reason = choice.finish_reason or reason
    return text, reason


def test_greedy_completions_equal_generate_also_in_flight_and_streamed(stories) -> None:
    model, tok = stories
    expected = reference(model, tok, PROMPTS)
    stopped = reference(model, tok, PROMPTS, stop=(" park", "ball"))
    with running(model, tok, max_batch=8) as (url, engine):
        c = client(url)
        one = c.completions.create(model="base", prompt=PROMPTS[0], max_tokens=40, temperature=0)
        assert one.choices[0].text == expected[0] and one.choices[0].finish_reason == "length"
        assert one.usage.prompt_tokens == len(encode_prompt(tok, PROMPTS[0])) and one.usage.completion_tokens == 40
        texts = in_flight(lambda p: c.completions.create(model="base", prompt=p, max_tokens=40, temperature=0)
                          .choices[0].text, PROMPTS)
        assert texts == expected
        streamed = in_flight(lambda p: stream_text(c, model="base", prompt=p, max_tokens=40, temperature=0,
                                                   stop=[" park", "ball"]), PROMPTS)
        assert [t for t, _ in streamed] == stopped  # stop strings: nothing past them was ever streamed
        assert {r for _, r in streamed} <= {"stop", "length"} and any(r == "stop" for _, r in streamed)
        batch = c.completions.create(model="base", prompt=PROMPTS[:3], max_tokens=40, temperature=0)
        assert [ch.text for ch in sorted(batch.choices, key=lambda ch: ch.index)] == expected[:3]
        assert engine.stats["steps"] < 40 * (1 + 8 + 8 + 3)  # requests in flight shared decode steps


def test_seeded_sampling_n_choices_and_logprobs(stories) -> None:
    model, tok = stories
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    expected = reference(model, tok, [PROMPTS[0]], seed=123, sampling=sampling)[0]
    with running(model, tok) as (url, _):
        c = client(url)
        r = c.completions.create(model="base", prompt=PROMPTS[0], max_tokens=40, temperature=0.9, top_p=0.95,
                                 seed=123, n=3)
        texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
        assert texts[0] == expected  # choice i samples with seed + i: choice 0 is `lmlab generate --seed`'s
        assert len(set(texts)) == 3 and 0 < r.usage.completion_tokens <= 120
        lp = c.completions.create(model="base", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=2)
    ch = lp.choices[0]
    assert len(ch.logprobs.tokens) == 8 and all(len(t) == 2 for t in ch.logprobs.top_logprobs)
    ids = encode_prompt(tok, PROMPTS[1])
    history = list(ids)
    with torch.no_grad():
        for token, token_lp, top in zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.top_logprobs):
            logp = model(torch.tensor([history]))[0, -1].log_softmax(-1)
            chosen = int(logp.argmax())
            assert token == tok.decode([chosen]) and token_lp == pytest.approx(float(logp[chosen]), abs=1e-4)
            assert max(top.values()) == pytest.approx(token_lp, abs=1e-6)  # greedy: the top alternative
            history.append(chosen)
    assert decode_continuation(tok, ids[-1:], history[len(ids):]) == ch.text  # a continuation keeps its leading space


def test_adapters_per_request_in_one_batch(stories, tmp_path: Path) -> None:
    base, tok = stories
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    for name, targets in (("a", ["wq", "wv"]), ("b", ["w1", "w2", "wo"])):
        add_adapter(model, name, LoRAConfig(rank=4, target_modules=targets))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_b." in pname:
                p.normal_(0, 0.2)
    names = [None, "a", "b", "a", None, "b", "b", "a"]
    expected = []
    for name, prompt in zip(names, PROMPTS):
        set_active_adapter(model, name)
        expected.append(reference(model, tok, [prompt])[0])
    assert len(set(expected)) == len(expected)  # the adapters change the outputs
    save_adapter(model, tmp_path / "a", name="a")
    with running(model, tok, adapters=["a", "b"], max_batch=8) as (url, engine):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["base", "a", "b"]
        texts = in_flight(lambda job: c.completions.create(model=job[0] or "base", prompt=job[1], max_tokens=40,
                                                           temperature=0).choices[0].text, list(zip(names, PROMPTS)))
    assert texts == expected
    reloaded = load_adapter_model(base, tmp_path / "a")
    assert reference(reloaded, tok, [PROMPTS[1]])[0] == expected[1]


def load_adapter_model(base, path):
    from lmlab.adapters.files import load_adapter

    return load_adapter(copy.deepcopy(base), path, name="a")


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_speculative_serving_equals_plain_greedy(stories, drafter: str) -> None:
    model, tok = stories
    expected = reference(model, tok, PROMPTS)
    if drafter == "lookup":
        d = PromptLookup(k=4)
    else:
        d = DraftModel(copy.deepcopy(model), k=3)
        with torch.no_grad():
            for p in d.model.parameters():
                p.add_(torch.randn_like(p) * p.std() * 0.1)
    with running(model, tok, drafter=d, max_batch=8, speculative_max_batch=8) as (url, engine):
        c = client(url)
        texts = in_flight(lambda p: c.completions.create(model="base", prompt=p, max_tokens=40, temperature=0)
                          .choices[0].text, PROMPTS)
        assert texts == expected
        assert 0 < engine.stats["accepted"] < engine.stats["drafted"]


@pytest.mark.slow
def test_smollm2_chat_and_completions_equal_generate() -> None:
    loaded = load_model("smollm2-135m-instruct", dtype="fp32")
    model, tok = loaded.model, loaded.tokenizer
    questions = ["What is the capital of France?", "Name a fruit.", "Say hello.", "What is 2 + 2?",
                 "Write one word.", "Who are you?", "What color is the sky?", "Count to three."]
    chat = reference(model, tok, questions, max_new=24, chat=True)
    plain = reference(model, tok, questions[:2], max_new=24)
    with running(model, tok, max_batch=8, context=512) as (url, _):
        c = client(url)
        answers = in_flight(lambda q: c.chat.completions.create(
            model="base", messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0
        ).choices[0].message.content, questions)
        assert answers == chat
        streamed = ""
        for chunk in c.chat.completions.create(model="base", messages=[{"role": "user", "content": questions[0]}],
                                               max_tokens=24, temperature=0, stream=True):
            streamed += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert streamed == chat[0]
        assert [c.completions.create(model="base", prompt=q, max_tokens=24, temperature=0).choices[0].text
                for q in questions[:2]] == plain


def test_bad_requests_get_400_and_the_server_keeps_serving(stories) -> None:
    model, tok = stories
    long_prompt = "Once upon a time " * 80
    with running(model, tok, max_batch=2, context=128) as (url, _):
        post = lambda path, body, **kw: httpx.post(f"{url}/v1/{path}", timeout=30, **kw)  # noqa: E731
        cases = [
            ("completions", dict(content=b"{not json", headers={"content-type": "application/json"}), "JSON"),
            ("chat/completions", dict(json={"model": "base"}), "messages"),
            ("chat/completions", dict(json={"model": "base", "messages": "hi"}), "messages"),
            ("completions", dict(json={"model": "base", "prompt": "x", "max_tokens": "ten"}), "max_tokens"),
            ("completions", dict(json={"model": "base", "prompt": 42}), "prompt"),
            ("completions", dict(json={"model": "base", "prompt": "x", "max_tokens": -1}), "max_tokens"),
            ("completions", dict(json={"model": "base", "prompt": "x", "temperature": 2.5}), "temperature"),
            ("completions", dict(json={"model": "base", "prompt": "x", "top_p": 0}), "top_p"),
            ("completions", dict(json={"model": "nope", "prompt": "x"}), "not found"),
            ("completions", dict(json={"model": "base", "prompt": long_prompt}), "context"),
            ("completions", dict(json={"model": "base", "prompt": [1, 2, 99999]}), "token ids"),
            ("completions", dict(json={"model": "base", "prompt": "x", "n": 3}), "n=3"),
            ("completions", dict(json={"model": "base", "prompt": "x", "frequency_penalty": 1.0}), "not supported"),
            ("chat/completions", dict(json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}),
             "chat_template"),
        ]
        for path, kw, fragment in cases:
            r = post(path, None, **kw)
            assert r.status_code == 400, (path, kw, r.text)
            err = r.json()["error"]
            assert fragment in err["message"] and err["type"] == "invalid_request_error", err
            good = client(url).completions.create(model="base", prompt="The cat", max_tokens=3, temperature=0)
            assert good.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError):
            client(url).completions.create(model="base", prompt="x", temperature=-1)
        assert httpx.get(f"{url}/v1/nothing").status_code == 404


def test_queue_limit_503_disconnect_frees_the_slot_and_time_limit(stories, monkeypatch) -> None:
    """Each decode step takes at least 5 ms here, so 500 tokens take >= 2.5 s whatever the CPU: the client's
    disconnect (milliseconds after its first chunk) always lands mid-stream. The time limit runs on a clock
    that advances 50 ms each time the engine reads it, so it fires after a few steps on any machine."""
    model, tok = stories
    step = Engine._step

    def slow_step(self) -> None:
        time.sleep(0.005)
        step(self)

    monkeypatch.setattr(Engine, "_step", slow_step)
    with running(model, tok, max_batch=1, max_queue=1, context=512) as (url, engine):
        body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the only row is busy now
            waiting = threading.Thread(target=lambda: httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": "base", "prompt": "The cat", "max_tokens": 5}))
            waiting.start()
            deadline = time.monotonic() + 10
            while engine.load()["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "x"}, timeout=30)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
        # the stream's client went away: its row is freed, the waiting request runs, nothing is left
        waiting.join(timeout=60)
        deadline = time.monotonic() + 10
        while engine.load()["running"] + engine.load()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load()["running"] == 0 and engine.load()["waiting"] == 0
        assert engine.stats["tokens"] < 500  # the disconnected stream stopped early
        ok = client(url).completions.create(model="base", prompt="The cat", max_tokens=4, temperature=0)
        assert ok.choices[0].finish_reason == "length"
    monkeypatch.setattr(Engine, "_step", step)
    ticks = iter(range(10**9))

    class Clock:
        """time.monotonic for the engine alone: 50 ms more on every read."""

        @staticmethod
        def monotonic() -> float:
            return 0.05 * next(ticks)

    monkeypatch.setattr(engine_module, "time", Clock)
    with running(model, tok, timeout_s=0.3, context=512) as (url, _):
        slow = client(url).completions.create(model="base", prompt="Once upon a time", max_tokens=500,
                                              temperature=0, stop=["never appears"])
        assert slow.choices[0].finish_reason == "length" and 0 < slow.usage.completion_tokens < 20


def test_the_serve_command_with_an_api_key_and_lmlab_generate_parity(shared_data, tmp_path: Path) -> None:
    """The real CLI: `lmlab serve` as a subprocess (key required on /v1, /health open), its greedy output
    equal to `lmlab generate`'s; SIGTERM stops it cleanly (the decode loop runs on its main thread, uvicorn
    in a helper); a port already taken ends it with uvicorn's error and a failing status; a bad --adapter is
    a one-line error."""
    bin_ = str(shared_data / "stories260K" / "stories260K.bin")
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "gen.jsonl"
    subprocess.run([sys.executable, "-m", "lmlab", "generate", bin_, "--prompt", PROMPTS[3], "--temperature", "0",
                    "--max-new-tokens", "30", "--dtype", "fp32", "--no-chat", "--out", str(out)],
                   check=True, env=env, capture_output=True)
    expected = json.loads(out.read_text())["output"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", bin_, "--port", str(port), "--dtype", "fp32",
                             "--api-key", "sekrit", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        c = client(url, "sekrit")
        assert c.models.list().data[0].id == "stories260K"
        r = c.completions.create(model="stories260K", prompt=PROMPTS[3], max_tokens=30, temperature=0)
        assert r.choices[0].text == expected
        taken = subprocess.run([sys.executable, "-m", "lmlab", "serve", bin_, "--port", str(port)], env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        assert taken.returncode != 0 and "address already in use" in taken.stderr
        assert client(url, "sekrit").models.list().data[0].id == "stories260K"  # the first one still serves
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    bad = subprocess.run([sys.executable, "-m", "lmlab", "serve", bin_, "--adapter", str(tmp_path / "missing")],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"lmlab serve: error: --adapter {str(tmp_path / 'missing')!r}: expected NAME=PATH"]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# what works headless on these machines (no sandbox as root; background networking off: the network is closed)
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]
TOY_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
def test_chat_page_in_headless_chromium(stories, tmp_path: Path) -> None:
    """Headless Chromium types two messages into the page at / and reads the streamed answers, which equal
    what the API gives for the same conversation (a toy chat template on stories260K keeps it fast)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    model, tok = stories
    tok = copy.copy(tok)
    tok.chat_template = TOY_TEMPLATE
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    with running(model, tok, context=512) as (url, _):
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options] == ["base"])
            for field, value in (("temperature", "0"), ("max_tokens", "30")):
                box = driver.find_element(By.ID, field)
                box.clear()
                box.send_keys(value)
            conversation, answers = [], []
            for text in ("Tell me a story about a cat.", "What happened next?"):
                driver.find_element(By.ID, "input").send_keys(text)
                driver.find_element(By.ID, "send").click()
                n = len(answers) + 1
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == n)
                bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
                answers.append(bubble.find_element(By.CLASS_NAME, "text").text)
                assert int(bubble.get_attribute("data-chunks")) > 1  # it arrived as a stream of chunks
                conversation.append({"role": "user", "content": text})
                api_answer = client(url).chat.completions.create(
                    model="base", messages=conversation, max_tokens=30, temperature=0, top_p=0.9).choices[0]
                assert answers[-1].strip() == api_answer.message.content.strip() and answers[-1].strip()
                conversation.append({"role": "assistant", "content": api_answer.message.content})
            assert "done" in driver.find_element(By.ID, "status").text
        finally:
            driver.quit()
