"""The OpenAI-compatible server: a real `flexquant-rt serve` process on 127.0.0.1, driven by the
official `openai` client (plain, streaming, chat) and by raw HTTP for bad input."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flexquant_rt import Engine  # noqa: E402
from flexquant_rt.server import ServerProcess  # noqa: E402
from flexquant_rt.controller import calibrate, calibration_text, save_profile, text_chunks  # noqa: E402

MODEL = "tiny"


class Server(ServerProcess):
    """`flexquant-rt serve` in a subprocess, logging next to the model file."""

    def __init__(self, model: Path, *args: str, name: str = MODEL):
        self.log = open(Path(model).with_suffix(".serve.log"), "a+")
        try:
            super().__init__(model, "--threads", "1", "--model-name", name, "--log-level", "warning", *args,
                             log=self.log)
        except RuntimeError:
            self.log.seek(0)
            print(self.log.read())
            self.log.close()
            raise

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        super().stop()
        self.log.close()


@pytest.fixture(scope="module")
def calibrated_tiny(tiny_fq, tmp_path_factory) -> Path:
    """The tiny model with a calibration profile (so the calibrated policies can run)."""
    path = tmp_path_factory.mktemp("serve") / "tiny.fq"
    shutil.copy(tiny_fq, path)
    with Engine(path, threads=1) as eng:
        prof = calibrate(eng, text_chunks(eng, calibration_text(), 2, 32, seed=0), progress=False)
    save_profile(path, prof)
    return path


@pytest.fixture(scope="module")
def server(calibrated_tiny):
    srv = Server(calibrated_tiny)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, route: str, body) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + route, content=content, headers={"Content-Type": "application/json"},
                      timeout=120)


# -- the openai client ----------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL


def test_completion_matches_the_engine(server, client, calibrated_tiny):
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    with Engine(calibrated_tiny, threads=1) as eng:
        want = eng.generate("hello world", max_new_tokens=12)
        n_prompt = len(eng.tokenize("hello world"))
    assert c.text == want
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == n_prompt
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.flexquant["policy"] == "static" and r.flexquant["mean_bits"] == 8.0


def test_openai_default_max_tokens_and_length_finish(client):
    r = client.completions.create(model=MODEL, prompt="abc", seed=1, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"  # OpenAI's default 16


def test_seed_reproducible_and_nothing_leaks_between_requests(client):
    kw = dict(model=MODEL, prompt="the seed", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(**kw)
    # a request with other sampling, bits, stop and seed in between must not leak into the next
    client.completions.create(model=MODEL, prompt="other", max_tokens=9, temperature=1.5, seed=7, stop=["a"],
                              extra_body={"flexquant": {"bits": 3}, "top_k": 5})
    b = client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.flexquant == b.flexquant and a.flexquant["mean_bits"] == 8.0


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="stop here", max_tokens=64, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(ch for ch in full[1:] if ch != "\ufffd")  # the random model writes mostly odd bytes
    r = client.completions.create(model=MODEL, prompt="stop here", max_tokens=64, temperature=0,
                                  stop=["never in there", stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_completion_equals_plain(client):
    kw = dict(model=MODEL, prompt="stream me", max_tokens=20, seed=3)
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].flexquant == plain.flexquant


def test_chat_plain_and_streaming_with_usage(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, seed=9)
    assert plain.object == "chat.completion"
    msg = plain.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert plain.usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, seed=9, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    # a multi-turn conversation and text content parts
    again = client.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=msgs + [{"role": "assistant", "content": msg.content},
                         {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "?"}]}])
    assert again.usage.prompt_tokens > plain.usage.prompt_tokens


def test_raw_sse_framing(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_flexquant_extension(client, calibrated_tiny):
    from flexquant_rt.controller import load_profile

    r = client.completions.create(model=MODEL, prompt="bits", max_tokens=8, temperature=0,
                                  extra_body={"flexquant": {"bits": 4}})
    assert r.flexquant["policy"] == "static" and r.flexquant["mean_bits"] == 4.0
    with Engine(calibrated_tiny, threads=1) as eng:
        assert r.choices[0].text == eng.generate("bits", max_new_tokens=8, bits=4)
        lo = min(load_profile(eng).levels)
    for policy in ("layerwise", "linearwise", "flexquant", "input_aware"):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=24,
                                           temperature=0, extra_body={"ignore_eos": True,
                                                                      "flexquant": {"policy": policy,
                                                                                    "budget_bits": 5.5}})
        fq = r.flexquant
        assert fq["policy"] == policy and fq["budget_bits"] == 5.5
        assert lo <= fq["mean_bits"] <= 8.0 and fq["bytes_read"] > 0 and fq["forward_passes"] >= 1
    # static layerwise allocation stays within its budget exactly
    r = client.completions.create(model=MODEL, prompt="q", max_tokens=4, temperature=0,
                                  extra_body={"flexquant": {"policy": "layerwise", "budget_bits": 5.0,
                                                            "sink_protect": False}})
    assert r.flexquant["mean_bits"] <= 5.0 + 1e-9
    for bad in ({"bits": 99}, {"policy": "layerwise"}, {"policy": "layerwise", "budget_bits": 1.0},
                {"policy": "nope", "budget_bits": 5}, {"bits": "8"}, {"bits": 8, "budget_bits": 5.0},
                {"policy": "static", "bits": 4, "levels": [4, 8]}, {"colour": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="q", max_tokens=2, extra_body={"flexquant": bad})
        assert e.value.status_code == 400 and "flexquant" in (e.value.param or ""), bad


def test_context_overflow_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "maximum context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.code == "model_not_found"


def concurrent_completions(srv, prompts: list[str], kw: list[dict]) -> list[str]:
    """Every prompt from its own client thread at once, odd ones streaming; the texts in order."""
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            c = srv.client()
            if i % 2:
                s = c.completions.create(model=MODEL, prompt=prompts[i], stream=True, **kw[i])
                got[i] = "".join(ch.choices[0].text for ch in s)
            else:
                got[i] = c.completions.create(model=MODEL, prompt=prompts[i], **kw[i]).choices[0].text
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    return [got[i] for i in range(len(prompts))]


def test_concurrent_clients_get_their_own_answers(server, client):
    prompts = [f"client {i} says" for i in range(6)]
    kw = [dict(max_tokens=20, seed=i, extra_body={"flexquant": {"bits": 3 + i % 6}}) for i in range(6)]
    alone = [client.completions.create(model=MODEL, prompt=p, **k).choices[0].text for p, k in zip(prompts, kw)]
    assert concurrent_completions(server, prompts, kw) == alone


def test_server_process_starts_again_when_its_port_was_taken(calibrated_tiny, monkeypatch):
    """The port ServerProcess picks may be taken before its child binds it: the child exits, and it
    starts again on another port (a listening socket here holds the first pick)."""
    import socket

    from flexquant_rt import server as server_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    picks = []
    real = server_module.free_port

    def pick(host: str = "127.0.0.1") -> int:
        picks.append(port if not picks else real(host))
        return picks[-1]

    monkeypatch.setattr(server_module, "free_port", pick)
    try:
        srv = Server(calibrated_tiny)
        try:
            assert picks[0] == port and len(picks) == 2 and srv.port == picks[1] != port
            assert srv.health()["status"] == "ok"
        finally:
            srv.stop()
    finally:
        taken.close()


def test_client_disconnect_mid_stream_leaves_the_server_healthy(server, client):
    before = server.health()["requests"]
    body = {"model": MODEL, "prompt": "long", "max_tokens": 240, "stream": True, "ignore_eos": True, "seed": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then hang up
    for _ in range(400):  # bounded: the worker finishes or abandons that request
        h = server.health()
        done = sum(h["requests"][k] - before[k] for k in ("completed", "cancelled"))
        if done >= 1 and not h["busy"]:
            break
        time.sleep(0.05)
    assert done == 1 and h["requests"]["failed"] == before["failed"]
    r = client.completions.create(model=MODEL, prompt="after", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens >= 1


# -- raw HTTP: bad input gets OpenAI's error body, and the server survives ------------------------

@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', None),                              # malformed JSON
    ("/v1/completions", b"[1, 2, 3]", None),                                                 # not an object
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": NaN}', None),       # not JSON
    ("/v1/completions", {"prompt": "x"}, "model"),                                           # missing field
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),  # wrong types
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": True}, "frobnicate"),  # unknown field
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, "max_tokens"),   # absurd values
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10 ** 30}, None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 1e9}, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": -1}, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 3}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": [10 ** 9]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, None),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
])
def test_bad_input_is_400_with_an_openai_error(server, route, body, param):
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert (err["param"] or "").startswith(param), err


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models/other", timeout=30).status_code == 404


def test_server_survives_all_of_it(server, client):
    for junk in (b"\xff\xfe", b"{" * 100_000, b'"just a string"', b"null", b""):
        assert post(server, "/v1/chat/completions", junk).status_code == 400
    assert server.proc.poll() is None
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}],
                                       max_tokens=3)
    assert r.choices[0].message.content is not None


# -- the worker, in-process: cancellation per token and the bounded queue -------------------------

def test_worker_cancels_within_a_token_and_rejects_when_full(calibrated_tiny):
    from flexquant_rt.controller import Static
    from flexquant_rt.server import ApiError, GenSpec, Job, Worker

    sampling = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=0,
                    ignore_eos=True)

    class HangUp(Static):
        """Sets the job's cancel flag (as a client disconnect does) before step `at`."""

        def __init__(self, flag, at: int):
            super().__init__(8)
            self.flag, self.at, self.steps = flag, at, 0

        def mask(self, info):
            self.steps += 1
            if self.steps == self.at:
                self.flag.set()
            return super().mask(info)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with Engine(calibrated_tiny, threads=1) as eng:
            w = Worker(eng, max_queue=2)
            spec = GenSpec(prompt="cancel me", max_tokens=200, sampling=sampling, stop=[], fq={"policy": "hangup"})
            jobs = [Job(spec, loop) for _ in range(3)]
            hangup = HangUp(jobs[0].cancel, at=5)
            w._controllers[json.dumps(spec.fq, sort_keys=True)] = hangup
            w.submit(jobs[0])
            w.submit(jobs[1])
            with pytest.raises(ApiError) as e:  # the queue holds 2: the third is turned away
                w.submit(jobs[2])
            assert e.value.status == 503
            jobs[1].cancel.set()  # its client left while it waited: it never runs
            w.start()
            for _ in range(6000):  # bounded wait for the worker to drop both
                if w.counts["cancelled"] == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # let the posted events land
            kinds = []
            while not jobs[0].events.empty():
                kinds.append(jobs[0].events.get_nowait()[0])
            assert kinds[0] == "start" and "done" not in kinds
            assert hangup.steps == 5  # no forward pass after the flag was seen
            assert jobs[1].events.empty()
            fq = {"policy": None, "bits": None}
            again = Job(GenSpec(prompt="cancel me", max_tokens=6, sampling=sampling, stop=[], fq=fq), loop)
            w.submit(again)
            pieces = []
            while True:
                kind, v = await asyncio.wait_for(again.events.get(), 120)
                if kind == "text":
                    pieces.append(v)
                elif kind == "done":
                    break
            assert v.completion_tokens == 6
            for _ in range(6000):  # (the count comes before the "done" event: this returns at once)
                if w.counts["completed"]:
                    break
                await asyncio.sleep(0.01)
            assert w.counts == {"completed": 1, "cancelled": 2, "rejected": 0, "failed": 0}
            w.stop()
            assert "".join(pieces) == eng.generate("cancel me", max_new_tokens=6, ignore_eos=True)

    asyncio.run(run())


# -- continuous batching (--batch N) --------------------------------------------------------------

def test_batched_server_gives_each_client_its_own_answer(server, client, calibrated_tiny):
    """8 concurrent clients (half streaming, own seeds and lengths) on a --batch 3 server get what
    the one-at-a-time server gives each alone; a mask policy runs, input_aware is refused."""
    prompts = [f"client {i} says" for i in range(8)]
    kw = [dict(max_tokens=8 + 3 * i, seed=i, temperature=0.7 + 0.1 * (i % 3)) for i in range(8)]
    alone = [client.completions.create(model=MODEL, prompt=p, **k).choices[0].text for p, k in zip(prompts, kw)]
    srv = Server(calibrated_tiny, "--batch", "3")
    try:
        assert concurrent_completions(srv, prompts, kw) == alone
        c = srv.client()
        r = c.completions.create(model=MODEL, prompt="policy", max_tokens=6,
                                 extra_body={"flexquant": {"policy": "flexquant", "budget_bits": 5.0}})
        assert r.choices[0].finish_reason in ("stop", "length") and r.flexquant["mean_bits"] <= 8
        with pytest.raises(openai.BadRequestError, match="in-step rules"):
            c.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                 extra_body={"flexquant": {"policy": "input_aware", "budget_bits": 5.0}})
        h = srv.health()
        assert h["requests"] == {"completed": 9, "cancelled": 0, "rejected": 1, "failed": 0} and not h["busy"]
    finally:
        srv.stop()


def test_batched_worker_cancels_one_request_and_finishes_the_others(calibrated_tiny):
    from flexquant_rt.server import GenSpec, Job, Worker

    sampling = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=0,
                    ignore_eos=True)
    fq = {"policy": None, "bits": None}

    class HangsUp(Job):
        """Its client hangs up after the second piece of text. The flag is set on the worker's
        thread as the piece is posted: a consumer that polls could see the pieces only after the
        200 tokens were done on a fast machine (as CI once did), and never cancel in time."""

        def __init__(self, spec, loop):
            super().__init__(spec, loop)
            self.pieces = 0

        def post(self, kind, value=None):
            super().post(kind, value)
            self.pieces += kind == "text"
            if self.pieces == 2:
                self.cancel.set()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with Engine(calibrated_tiny, threads=1, n_seq=2) as eng:
            w = Worker(eng, max_queue=8)
            specs = [GenSpec(prompt=f"job {i}", max_tokens=n, sampling=sampling, stop=[], fq=fq)
                     for i, n in enumerate((200, 7, 5))]
            jobs = [HangsUp(specs[0], loop)] + [Job(s, loop) for s in specs[1:]]
            for j in jobs:
                w.submit(j)
            w.start()
            texts = {1: [], 2: []}
            done = {}
            while len(done) < 2:
                for i in (0, 1, 2):
                    while not jobs[i].events.empty():
                        kind, v = jobs[i].events.get_nowait()
                        if i == 0:
                            assert kind != "done"
                        elif kind == "text":
                            texts[i].append(v)
                        elif kind == "done":
                            done[i] = v
                await asyncio.sleep(0.005)
            for _ in range(6000):
                if w.counts["cancelled"] == 1 and w.counts["completed"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert w.counts == {"completed": 2, "cancelled": 1, "rejected": 0, "failed": 0}
            assert not w.busy
            w.stop()
        with Engine(calibrated_tiny, threads=1) as solo:
            for i in (1, 2):
                assert "".join(texts[i]) == solo.generate(f"job {i}", max_new_tokens=specs[i].max_tokens,
                                                          ignore_eos=True)
                assert done[i].completion_tokens == specs[i].max_tokens

    asyncio.run(run())


@pytest.mark.parametrize("n_seq", [1, 2])
def test_worker_counts_a_request_before_its_last_event(calibrated_tiny, n_seq):
    """A client that has its answer (done, or a 400) finds it counted in /health: the worker counts
    before it posts the last event, one request at a time and batched."""
    from flexquant_rt.server import GenSpec, Job, Worker

    sampling = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=0,
                    ignore_eos=True)
    fq = {"policy": None, "bits": None}

    class Seen(Job):
        """Records the worker's counts as each last event is posted."""

        def post(self, kind, value=None):
            if kind in ("done", "error"):
                self.counts_then = dict(w.counts)
            super().post(kind, value)

    async def run() -> None:
        nonlocal w
        loop = asyncio.get_running_loop()
        with Engine(calibrated_tiny, threads=1, n_seq=n_seq) as eng:
            w = Worker(eng, max_queue=4)
            ok = Seen(GenSpec(prompt="count me", max_tokens=3, sampling=sampling, stop=[], fq=fq), loop)
            bad = Seen(GenSpec(prompt=[], max_tokens=3, sampling=sampling, stop=[], fq=fq), loop)  # no tokens: 400
            w.submit(ok)
            w.submit(bad)
            w.start()
            for job, kind in ((ok, "done"), (bad, "error")):
                while True:
                    k, _ = await asyncio.wait_for(job.events.get(), 120)
                    if k in ("done", "error"):
                        assert k == kind
                        break
            w.stop()
        # (batched, the 400 may come while the first request still decodes)
        assert ok.counts_then["completed"] == 1 and bad.counts_then["rejected"] == 1
        assert w.counts == {"completed": 1, "cancelled": 0, "rejected": 1, "failed": 0}

    w = None
    asyncio.run(run())


def test_batched_worker_fails_only_the_request_whose_controller_breaks(calibrated_tiny):
    from flexquant_rt.controller import Static
    from flexquant_rt.server import GenSpec, Job, Worker

    sampling = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=0,
                    ignore_eos=True)

    class Breaks(Static):
        def __init__(self):
            super().__init__(8)
            self.calls = 0

        def mask(self, info):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("controller broke")
            return super().mask(info)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with Engine(calibrated_tiny, threads=1, n_seq=2) as eng:
            w = Worker(eng, max_queue=8)
            bad_fq, ok_fq = {"policy": "breaks"}, {"policy": None, "bits": None}
            w._controllers[json.dumps(bad_fq, sort_keys=True)] = Breaks()
            jobs = [Job(GenSpec(prompt=p, max_tokens=8, sampling=sampling, stop=[], fq=fq), loop)
                    for p, fq in (("fine", ok_fq), ("broken", bad_fq))]
            for j in jobs:
                w.submit(j)
            w.start()
            ends: dict[int, tuple] = {}
            text = ""
            while len(ends) < 2:
                for i, j in enumerate(jobs):
                    while not j.events.empty():
                        kind, v = j.events.get_nowait()
                        if kind == "text" and i == 0:
                            text += v
                        elif kind in ("done", "error"):
                            ends[i] = (kind, v)
                await asyncio.sleep(0.005)
            assert ends[0][0] == "done" and ends[1][0] == "error" and ends[1][1].status == 500
            assert "controller broke" in ends[1][1].body()["error"]["message"]
            for _ in range(6000):
                if w.counts["completed"] == 1:
                    break
                await asyncio.sleep(0.01)
            assert w.counts == {"completed": 1, "cancelled": 0, "rejected": 0, "failed": 1} and not w.busy
            w.stop()
            assert text == eng.generate("fine", max_new_tokens=8, ignore_eos=True)

    asyncio.run(run())


# -- one real answer from SmolLM2 -------------------------------------------------------------------

def test_smollm2_answers_a_chat_question(smollm2_fq):
    srv = Server(smollm2_fq, name="smollm2")
    try:
        r = srv.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of Japan?"}],
            max_tokens=24, temperature=0)
        assert "Tokyo" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        # a client that hangs up stops its generation (2000 tokens would take minutes on a CPU):
        # streaming after two events, and non-streaming (the client times out after 1 s)
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
            lines = resp.iter_lines()
            next(lines), next(lines)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=1)
        for _ in range(1200):  # bounded: until the worker has dropped both
            h = srv.health()
            if h["requests"]["cancelled"] == 2 and not h["busy"]:
                break
            time.sleep(0.1)
        assert h["requests"] == {"completed": 1, "cancelled": 2, "rejected": 0, "failed": 0}
    finally:
        srv.stop()


# -- the CLI shares the policy factory; the base package stays free of the server stack ------------

def test_cli_generate_with_a_policy(calibrated_tiny, capsys):
    from flexquant_rt.cli import main

    assert main(["generate", str(calibrated_tiny), "hi", "--raw", "--policy", "layerwise", "--budget-bits", "5",
                 "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert main(["generate", str(calibrated_tiny), "hi", "--raw", "--policy", "layerwise",
                 "--max-new-tokens", "4", "--threads", "1"]) == 2
    assert "needs budget_bits" in capsys.readouterr().err


def test_importing_the_package_does_not_import_the_server_stack():
    import subprocess
    import sys

    code = "import sys, flexquant_rt, flexquant_rt.cli; sys.exit(any(m in sys.modules for m in ('fastapi', 'uvicorn')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
