"""`slmops keys init` and `slmops keys rotate-root`: the operator's signing keys (shared.releases).

The root key signs only root metadata: keep it offline. The control plane needs the release key
and root.json (SLMOPS_RELEASE_KEY_FILE, SLMOPS_ROOT_METADATA_FILE); devices need root.json.
"""

from __future__ import annotations

from pathlib import Path

import typer

from slmops.cli.app import app

keys_app = typer.Typer(help="Release signing keys: root (offline) and release (control plane).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def init(out: Path = typer.Option(..., "--out", help="Folder for root.key, release.key and root.json.")) -> None:
    """Make a root key pair, a release key pair and root.json (version 1)."""
    from control_plane.trust.releases import SigningConfigError, init_keys

    try:
        init_keys(out)
    except SigningConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from exc
    print(f"wrote {out}/root.key (keep offline), {out}/release.key (the control plane's) and {out}/root.json")
    print(f"control plane: SLMOPS_RELEASE_KEY_FILE={out}/release.key SLMOPS_ROOT_METADATA_FILE={out}/root.json")
    print(f"devices: root_metadata_file = {out}/root.json in the agent config (or trust on first use at enrollment)")


@keys_app.command("rotate-root")
def rotate(
    keys_dir: Path = typer.Option(..., "--dir", help="The folder `keys init` wrote."),
    new_root_key: bool = typer.Option(False, "--new-root-key", help="Replace the root key too."),
    keep_release_key: bool = typer.Option(False, "--keep-release-key", help="Keep the release key (default: revoke)."),
) -> None:
    """Append the next root version to root.json; copy it to the control plane, which hands it to devices."""
    from control_plane.trust.releases import rotate_root

    version = rotate_root(keys_dir, new_root_key=new_root_key, new_release_key=not keep_release_key)
    print(f"root version {version} written to {keys_dir}/root.json; restart the control plane with it")
