"""The benchmark's Quix Streams peer: a stateful per-key count and sum, exactly-once.

Started by `examples/src/bench/quix.rs` (the `bench` binary) in a virtualenv holding
quixstreams 3.28.1. Input records: key = UTF-8 string, value = JSON
`{"seq": int, "amount": int, "pad": str}`. For every input record it emits, with the same
key, JSON `{"count": c, "sum": s}` where `c` and `s` are that key's running count and sum of
`amount`, kept in Quix's RocksDB state (changelogged, so exactly-once covers it).

The input and output topics must already exist (the bench creates them with explicit
`retention.ms` and `retention.bytes` configs, which Quix copies to its changelog topic); Quix
creates only that changelog topic itself.

Prints `QUIX-READY` on stdout once the processing loop has started. SIGTERM stops it
cleanly (Quix commits the open checkpoint and exits 0).
"""

import argparse
import logging
import sys

from quixstreams import Application, State

# Quix logs this line right before its processing loop starts polling (app.py, 3.28.1). It
# has no public "started" hook, so a log filter turns the line into the readiness marker.
_STARTED_MESSAGE = "The application started and is now processing incoming messages"


class _ReadyMarker(logging.Handler):
    """Prints QUIX-READY to stdout the first time Quix logs its start line.

    A handler, not a logger filter: filters on the `quixstreams` logger do not see records
    propagated from its children (`quixstreams.app` logs the line).
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self._printed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._printed and _STARTED_MESSAGE in record.getMessage():
            self._printed = True
            print("QUIX-READY", flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True, help="bootstrap servers (host:port)")
    parser.add_argument("--input", required=True, help="input topic (must exist)")
    parser.add_argument("--output", required=True, help="output topic (must exist)")
    parser.add_argument("--group", required=True, help="consumer group id")
    parser.add_argument("--state-dir", required=True, help="directory for RocksDB state")
    parser.add_argument(
        "--commit-interval",
        type=float,
        default=None,
        help="seconds between checkpoints (default: Quix's own, 5 s)",
    )
    return parser.parse_args(argv)


def count_and_sum(value: dict, state: State) -> dict:
    count = state.get("count", 0) + 1
    total = state.get("sum", 0) + int(value["amount"])
    state.set("count", count)
    state.set("sum", total)
    return {"count": count, "sum": total}


def main(argv) -> int:
    args = parse_args(argv)

    options = {}
    if args.commit_interval is not None:
        options["commit_interval"] = args.commit_interval

    app = Application(
        broker_address=args.broker,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=args.state_dir,
        loglevel="INFO",
        **options,
    )
    logging.getLogger("quixstreams").addHandler(_ReadyMarker())

    input_topic = app.topic(args.input, key_deserializer="str", value_deserializer="json")
    output_topic = app.topic(args.output, key_serializer="str", value_serializer="json")

    sdf = app.dataframe(input_topic)
    sdf = sdf.apply(count_and_sum, stateful=True)
    sdf.to_topic(output_topic)

    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
