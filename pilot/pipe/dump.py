"""`splitpilot pipe dump`: print a captured frame stream as readable text.

For operators and developers debugging the pipe: give it bytes written by an
agent (to a wrapper's stdin) or by a wrapper (to its stdout), e.g. captured
with `strace -e write -xx` or `tee`, and it prints one message per frame in
protobuf text format. Frames are decoded only, not checked against the
conversation's order, so a stream cut from the middle still prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import BinaryIO

from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from pilot.errors import UsageError
from pilot.pipe import messages as m
from pilot.pipe.errors import UndecodableMessage
from pilot.pipe.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, check_max_frame_bytes, encode_varint


def register(subparsers: argparse._SubParsersAction) -> None:
    pipe = subparsers.add_parser("pipe", help="inspect agent <-> wrapper frame streams",
                                 description="Tools for the agent <-> wrapper pipe protocol.")
    pipe_sub = pipe.add_subparsers(title="pipe commands", metavar="PIPE_COMMAND")
    dump = pipe_sub.add_parser("dump", help="print a captured frame stream as text", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    dump.add_argument("file", nargs="?", default="-", metavar="FILE",
                      help="the captured bytes ('-' or nothing: standard input)")
    dump.add_argument("--from", dest="sender", choices=("agent", "wrapper"), required=True,
                      help="who wrote the stream: agent (AgentMessage frames) or wrapper (WrapperMessage)")
    dump.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES, metavar="N",
                      help=f"refuse frames longer than N bytes (default {DEFAULT_MAX_FRAME_BYTES})")
    dump.add_argument("--json", action="store_true",
                      help="JSON Lines: {index, offset, bytes, kind, message} per frame, message in protobuf's "
                           "canonical JSON mapping (field names in lowerCamelCase, 64-bit numbers as strings)")
    dump.set_defaults(handler=run_dump)
    pipe.set_defaults(handler=lambda _args: pipe.print_help(sys.stderr) or 2)


def dump_stream(source: BinaryIO, sender: str, out, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *,
                as_json: bool = False) -> int:
    """Print every frame of SOURCE (text format, or a JSON line each); return the number of frames."""
    envelope = m.AgentMessage if sender == "agent" else m.WrapperMessage
    decoder = FrameDecoder(max_frame_bytes)
    count = offset = 0
    while True:
        data = source.read(64 * 1024)
        if data:
            decoder.feed(data)
        else:
            decoder.feed_eof()
        while (frame := decoder.next_frame()) is not None:
            if frame is FrameDecoder.EOF:
                return count
            try:
                message = envelope.FromString(bytes(frame))   # a debugging tool: the copy is harmless
            except DecodeError as exc:
                raise UndecodableMessage(f"frame {count} at byte {offset}: {exc}") from None
            kind = message.WhichOneof("kind")
            if as_json:
                # A frame of a newer peer whose kind this build does not know has no kind here: null, as in text.
                body_json = json_format.MessageToDict(getattr(message, kind)) if kind else None
                print(json.dumps({"index": count, "offset": offset, "bytes": len(frame), "kind": kind,
                                  "message": body_json}), file=out)
            else:
                body = text_format.MessageToString(getattr(message, kind), as_one_line=True) if kind else ""
                print(f"#{count} @{offset} {len(frame)} B {kind or '(no kind set)'} {{ {body} }}", file=out)
            count += 1
            offset += len(encode_varint(len(frame))) + len(frame)


def run_dump(args: argparse.Namespace) -> int:
    try:
        check_max_frame_bytes(args.max_frame_bytes)
    except ValueError as exc:
        raise UsageError(f"--max-frame-bytes: {exc}") from None
    if args.file == "-":
        count = dump_stream(sys.stdin.buffer, args.sender, sys.stdout, args.max_frame_bytes, as_json=args.json)
    else:
        try:
            with open(args.file, "rb") as source:
                count = dump_stream(source, args.sender, sys.stdout, args.max_frame_bytes, as_json=args.json)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    print(f"{count} frames", file=sys.stderr)
    return 0
