"""The batch route: a batch's jobs as lines of OpenAI Batch API files, at half price.

api.py       the Files and Batches SDK calls (the second module that imports openai)
lines.py     request lines, custom ids, answer lines, a stream split into lines (pure)
context.py   what the route's steps share (the executor's Deps, the API, batch prices)
uploads.py   inputs uploaded once per sha256; provider files deleted after collection
dispatch.py  queued jobs -> provider batches: intent first, then upload, create or adopt
collect.py   a finished provider batch's files read as a stream, each line booked once
poll.py      the tick (beat, `editbatch status`, the local loop): recover, cancel,
             refresh, collect, dispatch, finish
"""
