# Shared by the bench scripts (sourced, not a bench: `make bench` runs bench/*.sh); sourced
# once BENCH_USER exists and PY is set.
#   AS / as_user CMD...: run CMD as $BENCH_USER (its groups and HOME, no XDG_RUNTIME_DIR)
#   ratio A B: A/B with two decimals
#   install_timer DIR: bench/timer.py as DIR/timer.py, readable by $BENCH_USER
AS=(setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups
    env -u XDG_RUNTIME_DIR USER="$BENCH_USER" LOGNAME="$BENCH_USER"
    HOME="$(getent passwd "$BENCH_USER" | cut -d: -f6)")
as_user() { "${AS[@]}" "$@"; }
ratio() { $PY -c "print(f'{$1/$2:.2f}')"; }
install_timer() { install -m 0644 "$(dirname "${BASH_SOURCE[0]}")/timer.py" "$1/timer.py"; }
