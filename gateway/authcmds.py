"""`gateway login|logout` and `hpcc login|logout`: registry credentials (gateway/login.py)."""
import sys

import click

from .cli import _common


@click.command(help="Log in to a registry: check the credentials with it, then store them "
                    "in the auth file pulls read first (--auth-file, else $REGISTRY_AUTH_FILE, "
                    "else ~/.docker/config.json), in docker's format.")
@click.argument("registry")
@click.option("-u", "--username", metavar="USER", help="User name (asked for on a terminal).")
@click.option("--password-stdin", is_flag=True,
              help="Read the password (or token) from standard input.")
@click.option("--auth-file", metavar="FILE", help="Auth file to write instead.")
@click.option("--insecure", is_flag=True,
              help="Allow plain HTTP / unverified TLS for this registry.")
@_common
@click.pass_obj
def login(obj, registry, username, password_stdin, auth_file, insecure, json_output, quiet):
    from .login import check_credentials, store_credentials

    interactive = sys.stdin.isatty()
    if not username:
        if not interactive or password_stdin:
            raise click.UsageError("give the user name with -u USER")
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif interactive:
        password = click.prompt("Password", hide_input=True, err=True)
    else:
        raise click.UsageError("no terminal to ask for the password: use --password-stdin")
    if not password:
        raise click.UsageError("the password is empty")
    note = check_credentials(obj.config, registry, username, password, insecure=insecure)
    path = store_credentials(registry, username, password, auth_file)
    if json_output:
        obj.emit({"registry": registry, "username": username, "auth_file": str(path)})
    elif not quiet:
        click.echo(f"logged in to {registry} as {username}; credentials in {path}"
                   + (f" ({note})" if note else ""), err=True)


@click.command(help="Remove a registry's credentials from the auth file.")
@click.argument("registry")
@click.option("--auth-file", metavar="FILE", help="Auth file to change instead.")
@_common
@click.pass_obj
def logout(obj, registry, auth_file, json_output, quiet):
    from .login import remove_credentials

    path, had = remove_credentials(registry, auth_file)
    if json_output:
        obj.emit({"registry": registry, "auth_file": str(path), "removed": had})
    elif not quiet:
        click.echo(f"removed the credentials for {registry} from {path}" if had else
                   f"no credentials for {registry} in {path}", err=True)



AUTH_COMMANDS = [login, logout]
