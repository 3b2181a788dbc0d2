"""Man pages and shell completions, generated from the command-line definitions themselves:
`gateway` and hpcc's image commands from their click groups, `hpcc run/exec/shell` from the
launcher's option tables and usage texts, `hpcc-hook` from its argparse parser, and
hpcc.toml(5) from the commented etc/hpcc.toml. `make install` runs

    python -m hpcc.clidoc OUTDIR

which writes OUTDIR/man/man{1,5,8}/... and OUTDIR/completions/{bash,zsh,fish}/..., so what
the pages and completions say cannot drift from what the programs accept. click-man covers
click programs only; one small generator serves the three parsers alike. Not on any launch
path.
"""
import re
import sys
from pathlib import Path

PROGS = {"hpcc": 1, "gateway": 8, "hpcc-hook": 8}
SUMMARY = {
    "hpcc": "run commands in container images on HPC clusters",
    "gateway": "pull and convert container images into the site image store",
    "hpcc-hook": "hpcc's OCI hooks: inject the host's MPI and NVIDIA GPUs into containers",
}
EXIT_STATUS = [
    ("0", "success"), ("1", "user error: bad reference, missing image, bad config or image"),
    ("2", "usage error"), ("3", "registry or network failure (worth retrying)"),
    ("125", "hpcc failed before the command ran"),
    ("126", "the command cannot be executed"), ("127", "the command was not found"),
]


class Command:
    """A command as the generators see it: name, one-line help, options (names, takes a
    value, help) and, for a group, subcommands."""

    def __init__(self, name, help="", options=(), commands=(), usage=""):
        self.name, self.help, self.usage = name, help, usage
        self.options = list(options)
        self.commands = list(commands)


def _click(cmd, name=None):
    import click
    opts = []
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            opts.append((p.opts + p.secondary_opts, not p.is_flag, p.help or ""))
    opts.append((["-h", "--help"], False, "Show the help and exit."))
    subs = []
    if isinstance(cmd, click.Group):
        subs = [_click(c, n) for n, c in sorted(cmd.commands.items())]
    return Command(name or cmd.name, (cmd.help or "").split("\n\n")[0].strip(), opts, subs)


def _launcher():
    from . import cli
    flags_help = {"--writable": "make the root writable", "--mpi": "inject the host's MPI"}
    opts = [([o], True, "") for o in sorted(cli._VALUE_OPTS)]
    opts += [([o], False, flags_help.get(o, "")) for o in sorted(cli._FLAGS)]
    opts.append((["-h", "--help"], False, "show the help"))
    out = []
    for name, (tail, what) in cli._WHAT.items():
        options = [o for o in opts if not (o[0] == ["--entrypoint"] and name != "run")]
        out.append(Command(name, what, options, usage=f"hpcc {name} [OPTIONS] IMAGE {tail}"))
    return out


def definitions():
    """{prog: Command} for hpcc, gateway and hpcc-hook."""
    return {"hpcc": _hpcc(), "gateway": _gateway(), "hpcc-hook": _hook()}


def _gateway():
    from .gateway.cli import _make_group
    return _click(_make_group("gateway", user_mode=False), "gateway")


def _hpcc():
    from . import cli
    from .gateway.cli import _make_group
    images = _click(_make_group("hpcc", user_mode=True), "hpcc")
    top = [(["-v", "--verbose"], False, "say what hpcc does, with timings"),
           (["-q", "--quiet"], False, "print only errors"),
           (["--version"], False, "print the version"), (["-h", "--help"], False, "")]
    extra = [Command("containers", "List or remove your named containers.",
                     [(["--json"], False, "")], [Command("rm", "Remove named containers.")]),
             Command("config", "Configuration commands.", [],
                     [Command("check", "Validate the site configuration.",
                              [(["-h", "--help"], False, "")])]),
             Command("doctor", "Check this host and say how to fix problems.",
                     [(["--json"], False, ""), (["--image"], True, "")]),
             Command("version", "Print hpcc's version.")]
    cmds = _launcher() + images.commands + extra
    head = cli.USAGE.split("\n\n")[1].strip()
    return Command("hpcc", head, top, sorted(cmds, key=lambda c: c.name))


def _hook():
    from .hooks.cli import _parser
    p = _parser()
    opts, choices = [], []
    for a in p._actions:
        if a.option_strings:
            opts.append((list(a.option_strings), a.nargs != 0, a.help or ""))
        elif a.choices:
            choices = list(a.choices)
    return Command("hpcc-hook", p.description or "", opts,
                   [Command(c, f"the {c} hook") for c in choices])


# -- shell completion ---------------------------------------------------------------------
def _words(opts):
    return [w for names, _v, _h in opts for w in names]


def bash(cmd):
    fn = "_" + cmd.name.replace("-", "_")
    cases = []
    for sub in cmd.commands:
        words = " ".join(_words(sub.options) + [c.name for c in sub.commands])
        cases.append(f'        {sub.name}) opts="{words}" ;;')
    top = " ".join(_words(cmd.options) + [c.name for c in cmd.commands])
    return f"""# bash completion for {cmd.name} (generated by hpcc.clidoc)
{fn}() {{
    local cur sub i opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    sub=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in -*) ;; *) sub="${{COMP_WORDS[i]}}"; break ;; esac
    done
    case "$sub" in
        "") opts="{top}" ;;
{chr(10).join(cases)}
        *) opts="" ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    [ ${{#COMPREPLY[@]}} -eq 0 ] && COMPREPLY=($(compgen -f -- "$cur"))
    return 0
}}
complete -F {fn} {cmd.name}
"""


def zsh(cmd):
    subs = " ".join(f"'{c.name}:{_q(c.help)}'" for c in cmd.commands)
    cases = []
    for sub in cmd.commands:
        words = " ".join(_words(sub.options) + [c.name for c in sub.commands])
        cases.append(f"    {sub.name}) compadd -- {words} ;;")
    top = " ".join(_words(cmd.options))
    return f"""#compdef {cmd.name}
# zsh completion for {cmd.name} (generated by hpcc.clidoc)
local -a subcommands
subcommands=({subs})
local sub=${{words[(i)[^-]*]}}
if (( CURRENT == 2 )) || [[ $words[2] == -* && CURRENT == 3 ]]; then
    _describe 'command' subcommands
    compadd -- {top}
    return
fi
case ${{words[2]}} in
{chr(10).join(cases)}
esac
_files
"""


def _q(s):
    return s.replace("'", "").replace(":", " ").replace("\n", " ")[:70]


def fish(cmd):
    lines = [f"# fish completion for {cmd.name} (generated by hpcc.clidoc)",
             f"complete -c {cmd.name} -f"]
    names = " ".join(c.name for c in cmd.commands)
    for c in cmd.commands:
        lines.append(f"complete -c {cmd.name} -n 'not __fish_seen_subcommand_from {names}' "
                     f"-a {c.name} -d '{_q(c.help)}'")
    for opt_names, takes, helptext in cmd.options:
        lines.append(f"complete -c {cmd.name} {_fish_opt(opt_names)}"
                     + (" -r" if takes else "") + (f" -d '{_q(helptext)}'" if helptext else ""))
    for c in cmd.commands:
        for opt_names, takes, helptext in c.options:
            lines.append(f"complete -c {cmd.name} -n '__fish_seen_subcommand_from {c.name}' "
                         f"{_fish_opt(opt_names)}" + (" -r -F" if takes else "")
                         + (f" -d '{_q(helptext)}'" if helptext else ""))
        for s in c.commands:
            lines.append(f"complete -c {cmd.name} -n '__fish_seen_subcommand_from {c.name}' "
                         f"-a {s.name}")
        if c.name in ("run", "exec", "shell", "import"):
            lines.append(f"complete -c {cmd.name} -n '__fish_seen_subcommand_from {c.name}' -F")
    return "\n".join(lines) + "\n"


def _fish_opt(names):
    parts = []
    for n in names:
        if n.startswith("--"):
            parts.append(f"-l {n[2:]}")
        elif n.startswith("-") and len(n) == 2:
            parts.append(f"-s {n[1]}")
    return " ".join(parts)


# -- man pages ----------------------------------------------------------------------------
def _roff(text):
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln
                     for ln in text.splitlines())


def _options(opts):
    out = []
    for names, takes, helptext in opts:
        label = ", ".join(f"\\fB{_roff(n)}\\fR" for n in names)
        label += " \\fIVALUE\\fR" if takes else ""
        out += [".TP", label, _roff(helptext or "")]
    return out


def man(cmd, section, date=""):
    from . import __version__
    out = [f'.TH {cmd.name.upper()} {section} "{date}" "hpcc {__version__}" "hpcc"',
           ".SH NAME", f"{_roff(cmd.name)} \\- {_roff(SUMMARY.get(cmd.name, cmd.help))}",
           ".SH SYNOPSIS", f"\\fB{_roff(cmd.name)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR ...",
           ".SH DESCRIPTION", _roff(cmd.help), ".SH OPTIONS", *_options(cmd.options),
           ".SH COMMANDS"]
    for c in cmd.commands:
        out += [".SS " + _roff(c.usage or f"{cmd.name} {c.name}"), _roff(c.help)]
        if c.commands:
            out += [".PP", "Subcommands: " + ", ".join(_roff(s.name) for s in c.commands) + "."]
        out += _options(c.options)
    out += [".SH EXIT STATUS"]
    for code, what in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _roff(what)]
    out += [".SH ENVIRONMENT", ".TP", "\\fBHPCC_CONFIG\\fR",
            "the site configuration file (default /etc/hpcc/hpcc.toml)",
            ".TP", "\\fBHPCC_STORE\\fR, \\fBHPCC_USER_STORE\\fR",
            "the site store and the user's store instead of the configured ones",
            ".SH FILES", "/etc/hpcc/hpcc.toml, /etc/hpcc/hooks.d/*.json",
            ".SH SEE ALSO",
            ", ".join(f"\\fB{n}\\fR({s})" for n, s in
                      [*((p, s) for p, s in PROGS.items() if p != cmd.name), ("hpcc.toml", 5)])]
    return "\n".join(out) + "\n"


def config_man(toml_text, date=""):
    """hpcc.toml(5) from the commented default config: each section, its keys with their
    defaults, and the comments above them."""
    from . import __version__
    out = [f'.TH HPCC.TOML 5 "{date}" "hpcc {__version__}" "hpcc"', ".SH NAME",
           "hpcc.toml \\- site configuration of hpcc", ".SH DESCRIPTION"]
    intro, comment = [], []
    section = None
    for line in toml_text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            comment.append(s.lstrip("#").strip())
            continue
        m = re.match(r"^\[(.+)\]$", s)
        if m:
            if section is None:
                out.append(_roff(" ".join(intro + comment)))
            else:
                out += ([".PP", _roff(" ".join(comment))] if comment else [])
            section = m.group(1)
            out += [".SH [" + _roff(section).upper() + "]"]
            comment = []
            continue
        m = re.match(r"^([A-Za-z0-9_]+)\s*=\s*(.*)$", s)
        if m and section is not None:
            out += [".TP", f"\\fB{_roff(m.group(1))}\\fR = {_roff(m.group(2))}",
                    _roff(" ".join(comment))]
            comment = []
        elif not s and section is None:
            intro += comment
            comment = []
    if comment:
        out += [".PP", _roff(" ".join(comment))]
    out += [".SH SEE ALSO", "\\fBhpcc\\fR(1), \\fBgateway\\fR(8), \\fBhpcc-hook\\fR(8)"]
    return "\n".join(out) + "\n"


def write_all(outdir, toml_path):
    outdir = Path(outdir)
    written = []
    for name, cmd in definitions().items():
        sec = PROGS[name]
        page = outdir / "man" / f"man{sec}" / f"{name}.{sec}"
        comp = {"bash": outdir / "completions" / "bash" / name,
                "zsh": outdir / "completions" / "zsh" / f"_{name}",
                "fish": outdir / "completions" / "fish" / f"{name}.fish"}
        for path, text in [(page, man(cmd, sec)), (comp["bash"], bash(cmd)),
                           (comp["zsh"], zsh(cmd)), (comp["fish"], fish(cmd))]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    page = outdir / "man" / "man5" / "hpcc.toml.5"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(config_man(Path(toml_path).read_text()))
    written.append(page)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m hpcc.clidoc OUTDIR etc/hpcc.toml")
    for p in write_all(sys.argv[1], sys.argv[2]):
        print(p)
