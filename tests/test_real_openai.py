"""
The OpenAI Python SDK, as users run it, through a C{mode: http} tunnel to
agents whose local service is a small OpenAI-compatible fake (chat
completions, streamed as server-sent events or not).

The SDK is synchronous: it runs in a thread (deferToThread) so the reactor
that runs rproxy and the agents is never blocked, with bounded timeouts
and no retries.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rproxy.tunnel.agent import AgentService
from rproxy.tunnel.config import parse_agent_config
from tests.support import ServiceMixin, async_test, listen, reactor, wait_for


def _chat(client: Any) -> Exception | str:
    """
    One chat completion for llama3 through the SDK (run in a thread): its
    answer's text, or the API error it raised.
    """
    try:
        answer = client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        return e
    return answer.choices[0].message.content or ""


class FakeOpenAI(Resource):
    """
    POST /v1/chat/completions answering "<agent> heard <n> characters"
    in the chat completion shapes the SDK parses: one object, or chunks
    as server-sent events ending with [DONE].
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        self.requests.append(body)
        heard = sum(len(m.get("content", "")) for m in body["messages"])
        words = [self.name, " heard ", str(heard), " characters"]
        model = body["model"]
        if not body.get("stream"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(words)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
            }).encode()
        request.setHeader(b"content-type", b"text/event-stream")
        for word in words:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        request.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
        request.finish()
        return NOT_DONE_YET


class RealOpenAITests(ServiceMixin, TestCase):
    timeout = 60

    async def start(self, **tunnel: Any) -> openai.OpenAI:
        """
        The tunnel (with the C{tunnel} keys besides), agents a (llama3) and
        b (qwen2), and an SDK client of its public port.
        """
        service = await self.start_service({
            "api_keys": [{"key": "agent-key", "level": -1, "name": "shared"}],
            "tunnels": [{"name": "gpu", "control": "tcp:0:interface=127.0.0.1", "proxy": "tcp:0:interface=127.0.0.1",
                         "public": "tcp:0:interface=127.0.0.1", "mode": "http", "open_timeout": "5s",
                         "strict_models": True, "model_body_limit": "60k", **tunnel}],
        })
        self.tunnel = service.tunnels["gpu"]
        self.services = {}
        self.agent_configs = {}
        self.agents: dict[str, AgentService] = {}
        for name, model in (("a", "llama3"), ("b", "qwen2")):
            local = self.services[name] = FakeOpenAI(name)
            site = Site(local)
            site.noisy = False
            port = await listen(site)
            self.addCleanup(port.stopListening)
            self.agent_configs[name] = parse_agent_config({
                "server": {"control": f"127.0.0.1:{self.tunnel.port_of('control')}",
                           "proxy": f"127.0.0.1:{self.tunnel.port_of('proxy')}"},
                "api_key": "agent-key", "agent_id": name, "models": [model],
                "services": [{"name": "web", "local": f"127.0.0.1:{port.getHost().port}"}],
            })
            self.start_agent(name)
        await wait_for(lambda: len(self.tunnel.registry.agents) == 2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.tunnel.port_of('public')}/v1",
                               api_key="sk-user", timeout=10.0, max_retries=0)
        self.addCleanup(client.close)
        return client

    def start_agent(self, name: str) -> None:
        agent = self.agents[name] = AgentService(self.agent_configs[name], reactor)
        agent.startService()
        self.addCleanup(agent.stopService)

    @async_test
    async def test_streaming_chat_routed_by_model(self) -> None:
        """
        stream=True: the SDK receives every chunk's content, from the agent
        serving the body's model.
        """
        client = await self.start()

        def chat(model: str) -> str:
            stream = client.chat.completions.create(model=model, stream=True,
                                                    messages=[{"role": "user", "content": "hello"}])
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        for _ in range(2):
            self.assertEqual(await deferToThread(chat, "qwen2"), "b heard 5 characters")
            self.assertEqual(await deferToThread(chat, "llama3"), "a heard 5 characters")

    @async_test
    async def test_plain_chat_routed_by_model(self) -> None:
        """Without streaming the SDK gets the completion from the right agent."""
        client = await self.start()

        def chat(model: str) -> str:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            return answer.choices[0].message.content or ""

        self.assertEqual(await deferToThread(chat, "llama3"), "a heard 2 characters")
        self.assertEqual(await deferToThread(chat, "qwen2"), "b heard 2 characters")

    @async_test
    async def test_long_prompt_routes_by_model(self) -> None:
        """
        A prompt of 40,000 characters (the SDK writes messages before
        model) still goes to the agent serving the model, streamed or not.
        """
        client = await self.start()
        prompt = "x" * 40000

        def chat(model: str, stream: bool) -> str:
            messages: Any = [{"role": "user", "content": prompt}]
            if stream:
                chunks = client.chat.completions.create(model=model, stream=True, messages=messages)
                return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            return client.chat.completions.create(model=model, messages=messages).choices[0].message.content or ""

        for stream in (True, False):
            self.assertEqual(await deferToThread(chat, "qwen2", stream), "b heard 40000 characters")
            self.assertEqual(await deferToThread(chat, "llama3", stream), "a heard 40000 characters")
        self.assertEqual(len(self.services["a"].requests), 2)

    @async_test
    async def test_unknown_model_error_shows_rproxys_message(self) -> None:
        """
        With strict models an unknown model is an SDK NotFoundError that
        carries rproxy's message and code, long prompt or not.
        """
        client = await self.start()

        def chat(content: str) -> Exception:
            try:
                client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": content}])
            except openai.APIStatusError as e:
                return e
            raise AssertionError("no error")

        for content in ("hi", "y" * 40000):
            error = await deferToThread(chat, content)
            self.assertIsInstance(error, openai.NotFoundError)
            self.assertEqual((error.status_code, error.code), (404, "model_not_found"))  # type: ignore[attr-defined]
            self.assertIn("model 'gpt-9' is not served by any agent", error.message)  # type: ignore[attr-defined]
        self.assertEqual([len(s.requests) for s in self.services.values()], [0, 0])

    @async_test
    async def test_rate_limit_is_a_rate_limit_error(self) -> None:
        """
        Over the tunnel's rate_limit the SDK raises RateLimitError with
        rproxy's message and OpenAI's code (not "429 None None").
        """
        client = await self.start(rate_limit={"key": "api_key", "rate": "1/m"})

        self.assertEqual(await deferToThread(_chat, client), "a heard 2 characters")
        error = await deferToThread(_chat, client)
        self.assertIsInstance(error, openai.RateLimitError)
        self.assertEqual((error.status_code, error.code), (429, "rate_limit_exceeded"))  # type: ignore[union-attr]
        self.assertIn("rate limit 'api_key' exceeded", error.message)  # type: ignore[union-attr]

    @async_test
    async def test_reconnecting_agent_is_a_retryable_error(self) -> None:
        """
        While the only agent serving a model is away (until it logs in
        again), the SDK gets a 503, an InternalServerError it retries (not
        NotFoundError, which it does not); back, the agent answers.
        """
        client = await self.start()

        await self.agents["a"].stopService()
        await wait_for(lambda: "a" not in self.tunnel.registry.agents)
        error = await deferToThread(_chat, client)
        self.assertIsInstance(error, openai.InternalServerError)
        self.assertEqual((error.status_code, error.code), (503, "service_unavailable"))  # type: ignore[union-attr]
        self.assertEqual(error.response.headers["retry-after"], "1")  # type: ignore[union-attr]
        self.start_agent("a")
        await wait_for(lambda: "a" in self.tunnel.registry.agents)
        self.assertEqual(await deferToThread(_chat, client), "a heard 2 characters")

    @async_test
    async def test_models_list_is_the_gateways(self) -> None:
        """
        client.models.list() gives every agent's models, the same each
        time (not one agent's in turn); models.retrieve() one of them.
        """
        client = await self.start()

        def models() -> list[str]:
            return [model.id for model in client.models.list()]

        for _ in range(4):
            self.assertEqual(await deferToThread(models), ["llama3", "qwen2"])
        model = await deferToThread(client.models.retrieve, "qwen2")
        self.assertEqual((model.id, model.object, model.owned_by), ("qwen2", "model", "rproxy"))
