"""Drives a running gateway with the official OpenAI and Anthropic Python SDKs.

Run by tests/sdk_compat.rs, which starts the gateway and a mock upstream and passes their address in
REPRISE_BASE and a gateway key in REPRISE_KEY. Exits non-zero with the failing check on the first
mismatch, so the wire format is proven by clients nobody here wrote.
"""
import os
import sys

import anthropic
import openai

BASE = os.environ["REPRISE_BASE"]
KEY = os.environ["REPRISE_KEY"]


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def openai_checks():
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0)

    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello sdk"}], temperature=0.2,
        response_format={"type": "text"}, extra_body={"metadata": {"k": "v"}},
    )
    check(completion.choices[0].message.content == "echo: hello sdk", "openai: non-streaming content")
    check(completion.usage.total_tokens == 18, "openai: usage")
    check(completion.choices[0].finish_reason == "stop", "openai: finish_reason")

    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}])
    check(raw.headers.get("x-reprise-target") == "mock/ok", "openai: x-reprise-target header")
    check(len(raw.headers.get("x-request-id", "")) >= 32, "openai: x-request-id header")

    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    check(text == "echo: stream me please", "openai: streamed text")
    check(usage is not None and usage.total_tokens == 18, "openai: usage in the last chunk")

    prompted = client.chat.completions.with_raw_response.create(
        model="chat", messages=[], user="sdk-user",
        extra_body={"prompt": {"id": "greet", "variables": {"name": "SDK"}}})
    check(prompted.headers.get("x-reprise-prompt-version") == "1", "openai: a prompt in extra_body")
    check(prompted.parse().choices[0].message.content == "echo: Say hello to SDK",
          "openai: the prompt rendered")
    via_header = client.chat.completions.create(
        model="chat", messages=[],
        extra_headers={"x-reprise-prompt": "greet@v1", "x-reprise-prompt-variables": '{"name": "Header"}'})
    check(via_header.choices[0].message.content == "echo: Say hello to Header",
          "openai: a prompt by header")
    try:
        client.chat.completions.create(model="chat", messages=[], extra_body={"prompt": {"id": "greet"}})
        check(False, "openai: a missing variable is an error")
    except openai.BadRequestError as error:
        check(error.body["param"] == "prompt.variables.name", "openai: a missing variable is a 400 naming it")

    tools = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    )
    call = tools.choices[0].message.tool_calls[0]
    check(call.function.name == "get_weather" and call.function.arguments == '{"city":"Paris"}', "openai: tool call")

    streamed_args = ""
    for chunk in client.chat.completions.create(
            model="tools", messages=[{"role": "user", "content": "weather?"}], stream=True):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed_args += tc.function.arguments or ""
    check(streamed_args == '{"city":"Paris"}', "openai: streamed tool call arguments")

    claude = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "via claude"}])
    check(claude.choices[0].message.content == "echo: via claude", "openai: served by the Anthropic upstream")

    emb = client.embeddings.create(model="embed", input="hello")
    check(emb.data[0].embedding == [0.1, -0.2, 0.3], "openai: embeddings")

    ids = sorted(m.id for m in client.models.list())
    check("chat" in ids and "claude" in ids, "openai: models.list")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        check(False, "openai: unknown model raises")
    except openai.NotFoundError as e:
        check(e.code == "model_not_found", "openai: unknown model -> NotFoundError")

    try:
        client.chat.completions.create(model="chat", messages=[{"role": "bot", "content": "x"}])
        check(False, "openai: bad role raises")
    except openai.BadRequestError as e:
        check(e.param == "messages[0].role", "openai: bad input -> BadRequestError naming the param")

    try:
        openai.OpenAI(base_url=f"{BASE}/v1", api_key="wrong", max_retries=0).models.list()
        check(False, "openai: wrong key raises")
    except openai.AuthenticationError:
        check(True, "openai: wrong key -> AuthenticationError")

    try:
        text = ""
        for chunk in client.chat.completions.create(
                model="drop", messages=[{"role": "user", "content": "one two three"}], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        check(False, f"openai: a broken stream raises (got {text!r} as if complete)")
    except openai.APIError as e:
        check("mid-stream" in str(e), "openai: a broken stream raises APIError")


def anthropic_checks():
    client = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0)
    message = client.messages.create(
        model="chat", max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": "hello claude sdk"}],
    )
    check(message.content[0].text == "echo: hello claude sdk", "anthropic: non-streaming text")
    check(message.stop_reason == "end_turn", "anthropic: stop_reason")
    check(message.usage.output_tokens == 7, "anthropic: usage")

    with client.messages.stream(model="chat", max_tokens=64,
                                messages=[{"role": "user", "content": "stream it"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == "echo: stream it", "anthropic: streamed text")
    check(final.stop_reason == "end_turn" and final.usage.output_tokens == 7, "anthropic: final streamed message")

    tool = client.messages.create(
        model="tools", max_tokens=64, messages=[{"role": "user", "content": "weather?"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
    )
    check(tool.stop_reason == "tool_use" and tool.content[0].input == {"city": "Paris"}, "anthropic: tool use")

    via_native = client.messages.create(model="claude", max_tokens=32, messages=[{"role": "user", "content": "round trip"}])
    check(via_native.content[0].text == "echo: round trip", "anthropic: Anthropic client through an Anthropic upstream")

    try:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        check(False, "anthropic: unknown model raises")
    except anthropic.NotFoundError:
        check(True, "anthropic: unknown model -> NotFoundError")


openai_checks()
anthropic_checks()
print("all SDK checks passed")
