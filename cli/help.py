"""An example for every command's ``--help``, kept in one table so commands can move between
modules without losing theirs (a command missing here fails tests/unit/test_cli_help.py)."""

from __future__ import annotations

import click

EXAMPLES: dict[str, list[str]] = {
    "": ["chatspace-jobs submit traits_sample --wait",
         "chatspace-jobs status JOB --watch",
         "chatspace-jobs artifacts get JOB -o results/"],
    "submit": ["chatspace-jobs submit traits_sample --dtype float32 --wait",
               "chatspace-jobs submit roles_sample --kind rollout --steer spec.json",
               "chatspace-jobs submit traits_240 --judge workers:Qwen/Qwen3-32B  # judge pool"],
    "status": ["chatspace-jobs status                  # queued and running jobs",
               "chatspace-jobs status JOB --watch      # live per-persona progress"],
    "list": ["chatspace-jobs list --state failed --limit 10",
             "chatspace-jobs list --json | jq -r '.[].id'"],
    "events": ["chatspace-jobs events JOB"],
    "cancel": ["chatspace-jobs cancel JOB"],
    "retry": ["chatspace-jobs retry JOB"],
    "analyze": ["chatspace-jobs analyze JOB                 # pos_neg vectors",
                "chatspace-jobs analyze JOB --vector pos_all --json"],
    "artifacts": ["chatspace-jobs artifacts ls JOB",
                  "chatspace-jobs artifacts get JOB -o results/"],
    "artifacts ls": ["chatspace-jobs artifacts ls JOB",
                     "chatspace-jobs artifacts ls chatspace/tiny_qwen3/"],
    "artifacts get": ["chatspace-jobs artifacts get JOB -o results/   # whole job, resumable",
                      "chatspace-jobs artifacts get chatspace/.../curious.safetensors -o c.st"],
    "artifacts url": ["chatspace-jobs artifacts url KEY --expires 600"],
    "workers": ["chatspace-jobs workers", "chatspace-jobs workers --json"],
    "workers release": ["chatspace-jobs workers release gpu0@host"],
    "workers reload": ["chatspace-jobs workers reload gpu0@host"],
    "datasets": ["chatspace-jobs datasets ls"],
    "datasets ls": ["chatspace-jobs datasets ls --json"],
    "datasets pull": ["chatspace-jobs datasets pull traits_240 roles_240",
                      "chatspace-jobs datasets pull traits_240 --from release.tar.gz"],
    "datasets validate": ["chatspace-jobs datasets validate traits_240",
                          "chatspace-jobs datasets validate ./my_traits/"],
    "artifacts export": ["chatspace-jobs artifacts export JOB --format assistant-axis -o out/"],
    "ready": ["chatspace-jobs ready && echo ready"],
    "sweep": ["chatspace-jobs sweep JOB                  # the score-vs-scale table",
              "chatspace-jobs sweep JOB -o sweep.png --open"],
    "db": ["chatspace-jobs db upgrade"],
    "db upgrade": ["CHATSPACE_DATABASE_URL=postgresql+psycopg://... chatspace-jobs db upgrade"],
    "api": ["chatspace-jobs api --port 8000   # then open http://127.0.0.1:8000/ui/"],
    "steer-spec": ["chatspace-jobs steer-spec", "chatspace-jobs steer-spec --schema > steer.json"],
    "worker": ["chatspace-jobs worker --model Qwen/Qwen3-8B --dtype bfloat16 --gpus 0,1",
               "chatspace-jobs worker --exit-when-idle",
               "chatspace-jobs worker --judge-model Qwen/Qwen3-32B --gpus 2,3   # judge pool"],
}


def _epilog(lines: list[str]) -> str:
    # "\b" keeps click from re-wrapping the example lines
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def add_examples(group: click.Group, path: str = "") -> None:
    """Set every command's epilog from EXAMPLES (commands without an entry keep theirs)."""
    if path in EXAMPLES and not group.epilog:
        group.epilog = _epilog(EXAMPLES[path])
    for name, cmd in group.commands.items():
        sub = f"{path} {name}".strip()
        if isinstance(cmd, click.Group):
            add_examples(cmd, sub)
        elif sub in EXAMPLES and not cmd.epilog:
            cmd.epilog = _epilog(EXAMPLES[sub])


def missing(group: click.Group, path: str = "") -> list[str]:
    """Commands with no example (the test keeps this empty)."""
    out = []
    for name, cmd in group.commands.items():
        sub = f"{path} {name}".strip()
        if sub not in EXAMPLES:
            out.append(sub)
        if isinstance(cmd, click.Group):
            out += missing(cmd, sub)
    return out
