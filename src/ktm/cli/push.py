"""``ktm push CKPT REPO_ID``: upload a saved ktm folder to the Hugging Face hub (``ktm.hub``)."""

from .options import HelpFormatter


def cmd_push(args) -> int:
    from ..hub import push_folder

    url = push_folder(args.checkpoint, args.repo_id, base_reference=args.base, private=args.private or None,
                      revision=args.revision, commit_message=args.message)
    print(f"pushed {args.checkpoint} to {args.repo_id}: {url}")
    print(f"load it with: ktm generate --checkpoint {args.repo_id} ..., or "
          f"KTokenMerging.from_pretrained({args.repo_id!r})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a saved ktm model folder to the Hugging Face hub",
                       formatter_class=HelpFormatter,
                       description="Uploads exactly the folder's files (a model card README.md is added when it "
                                   "has none). Log in first (huggingface-cli login, or set HF_TOKEN).")
    p.add_argument("checkpoint", help="a saved ktm model folder (e.g. OUT/model) or zoo:NAME")
    p.add_argument("repo_id", help="the hub repository, org/name (created if missing)")
    p.add_argument("--base", default=None,
                   help="the hub id of the base model, for a model trained on a local base folder or file")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="the branch to push to (default: main)")
    p.add_argument("--message", default=None, help="the commit message")
    p.set_defaults(func=cmd_push)
