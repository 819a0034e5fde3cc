"""Job events → OpenAI stream chunks, including a failure after the stream began."""

from __future__ import annotations

from api.openai.serving import ChunkWriter

TOKEN = {"type": "token", "text": "Hi", "index": 0}
DONE = {
    "type": "done",
    "status": "succeeded",
    "result": {"finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 1},
}


def test_chat_chunks_open_with_the_role_and_close_with_usage() -> None:
    writer = ChunkWriter("job_x", "m", chat=True, include_usage=True)
    chunks = [c for e in (TOKEN, DONE) for c in writer.chunks(e)]
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hi"}, {}, None]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert {c["id"] for c in chunks} == {"chatcmpl-job_x"}


def test_completion_chunks_carry_text_and_no_usage_unless_asked() -> None:
    writer = ChunkWriter("job_y", "m", chat=False, include_usage=False)
    chunks = [c for e in (TOKEN, DONE) for c in writer.chunks(e)]
    assert [(c["object"], c["choices"][0]["text"]) for c in chunks] == [
        ("text_completion", "Hi"),
        ("text_completion", ""),
    ]
    assert all("usage" not in c for c in chunks)


def test_failure_mid_stream_is_an_openai_error_object() -> None:
    writer = ChunkWriter("job_z", "m", chat=True, include_usage=True)
    list(writer.chunks(TOKEN))
    failed = {
        "type": "done",
        "status": "timed_out",
        "error": {"code": "TIMEOUT", "message": "late"},
    }
    (chunk,) = writer.chunks(failed)
    assert chunk == {
        "error": {"message": "late", "type": "server_error", "param": None, "code": "TIMEOUT"}
    }
