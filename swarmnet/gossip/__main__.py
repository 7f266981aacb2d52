"""``python -m swarmnet.gossip agent ...``: the gossip agent without the rest of the CLI."""

from swarmnet.gossip.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
