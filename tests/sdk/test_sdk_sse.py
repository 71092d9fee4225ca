"""The SSE parser on its own: comments, CRLF leftovers, data with/without space, multi-line, [DONE]."""

import asyncio

from llmengine.sse import SSEDecoder, aiter_sse_data, iter_sse_data


def test_events_end_at_blank_lines_and_fields_parse_with_or_without_space():
    lines = ["data: {\"a\": 1}", "", "data:{\"b\": 2}", "", "data:  two spaces keep one", ""]
    assert list(iter_sse_data(lines)) == ['{"a": 1}', '{"b": 2}', " two spaces keep one"]


def test_comments_and_other_fields_are_ignored():
    lines = [": ping", "", "event: message", "id: 7", "retry: 100", ":another", "data: x", "", ": bye", ""]
    assert list(iter_sse_data(lines)) == ["x"]


def test_multi_line_data_joins_with_newline():
    assert list(iter_sse_data(["data: {\"a\":", "data: 1}", ""])) == ['{"a":\n1}']


def test_trailing_carriage_returns_are_stripped():
    assert list(iter_sse_data(["data: x\r", "\r", "data: y\r\n", "\r\n"])) == ["x", "y"]


def test_done_sentinel_ends_the_stream():
    lines = ["data: 1", "", "data: [DONE]", "", "data: never", ""]
    assert list(iter_sse_data(lines)) == ["1"]


def test_event_cut_off_by_close_is_still_delivered_but_done_is_not():
    assert list(iter_sse_data(["data: 1", "", "data: last"])) == ["1", "last"]
    assert list(iter_sse_data(["data: 1", "", "data: [DONE]"])) == ["1"]


def test_decoder_returns_nothing_until_an_event_ends():
    decoder = SSEDecoder()
    assert decoder.feed("data: a") is None
    assert decoder.feed("data: b") is None
    assert decoder.feed("") == "a\nb"
    assert decoder.feed("") is None  # a blank line with no data dispatches nothing


def test_async_parser_matches_sync():
    lines = [": ping", "", "data:1", "", "data: 2", "data: 3", "", "data: [DONE]", "", "data: 4", ""]

    async def collect():
        async def gen():
            for line in lines:
                yield line

        return [d async for d in aiter_sse_data(gen())]

    assert asyncio.run(collect()) == list(iter_sse_data(lines)) == ["1", "2\n3"]
