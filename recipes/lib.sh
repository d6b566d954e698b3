# shellcheck shell=bash
# Shared helpers for the recipes in this directory. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Provides logging (log, warn, die), argument errors (usage, arg_error, need_value, check_int,
# check_number), path helpers (abspath, find_input, require_file, require_cmd) and the stamp files
# that make every step idempotent and resumable (config_add, config_add_nondefault, stamp_check,
# stamp_done, step_done, step_mark).
#
# Stamp protocol (one output directory per step):
#   OUT/.config  written when the step starts: its configuration, one "key=value" line per setting.
#   OUT/.done    written (atomically) when the step has finished: the same lines, plus comments.
# stamp_check OUT FLAG then
#   - returns 0 (the caller logs and exits) when OUT/.done holds the same configuration;
#   - dies with "OUT was made with another configuration (key: old -> new); delete it or choose
#     another FLAG" when OUT/.done or OUT/.config holds a different one;
#   - dies when OUT exists, is not empty and has no stamp (not made by a recipe: we never
#     overwrite or resume into it);
#   - otherwise (new directory, or a run with the same configuration that was interrupted) creates
#     OUT, writes OUT/.config and returns 1: the caller runs (or resumes) the step.

if [[ -n ${_RECIPES_LIB_LOADED:-} ]]; then
    return 0
fi
_RECIPES_LIB_LOADED=1

RECIPE_SCRIPT=${RECIPE_SCRIPT:-${BASH_SOURCE[1]:-$0}}
RECIPE_NAME=$(basename "$RECIPE_SCRIPT" .sh)
RECIPES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The fairseq plugin (--user-dir). QPLUGIN_USER_DIR overrides it (e.g. an installed copy).
QPLUGIN_USER_DIR=${QPLUGIN_USER_DIR:-$(cd "$RECIPES_DIR/../fairseq_qplugin" 2>/dev/null && pwd || true)}

_log() {
    local level=$1
    shift
    printf '%s | %-5s | %s | %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$level" "$RECIPE_NAME" "$*" >&2
}
log() { _log INFO "$@"; }
warn() { _log WARN "$@"; }
die() {
    _log ERROR "$@"
    exit 1
}

# Print the comment block at the top of the calling script (after the shebang) as usage text.
usage() {
    awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$RECIPE_SCRIPT"
}

arg_error() {
    printf '%s: error: %s\nRun "%s --help" for usage.\n' "$RECIPE_NAME" "$*" "$RECIPE_SCRIPT" >&2
    exit 2
}

# need_value FLAG "$#" : the flag at $1 of the caller needs a value ($# must be >= 2).
need_value() {
    [[ $2 -ge 2 ]] || arg_error "$1 needs a value"
}

check_int() { # check_int FLAG VALUE [MIN]
    [[ $2 =~ ^[0-9]+$ ]] || arg_error "$1 must be a non-negative integer, got '$2'"
    [[ -z ${3:-} || $2 -ge $3 ]] || arg_error "$1 must be >= $3, got '$2'"
}

check_number() { # check_number FLAG VALUE
    [[ $2 =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || arg_error "$1 must be a number, got '$2'"
}

abspath() { realpath -m -- "$1"; }

require_file() { # require_file PATH WHAT
    [[ -f $1 ]] || die "${2:-file} not found: $1"
}

require_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 ||
            die "command '$c' not found on PATH (activate the virtualenv with fairseq, e.g. '. .venv/bin/activate')"
    done
}

require_plugin() {
    [[ -n $QPLUGIN_USER_DIR && -f $QPLUGIN_USER_DIR/__init__.py ]] ||
        die "fairseq plugin not found (expected $RECIPES_DIR/../fairseq_qplugin/__init__.py); set QPLUGIN_USER_DIR"
}

# find_input DIR BASENAME -> prints DIR/BASENAME or DIR/BASENAME.gz (plain file preferred); fails if neither.
find_input() {
    if [[ -f $1/$2 ]]; then
        printf '%s\n' "$1/$2"
    elif [[ -f $1/$2.gz ]]; then
        printf '%s\n' "$1/$2.gz"
    else
        return 1
    fi
}

# cat_input FILE: the file's text, decompressed if it ends in .gz.
cat_input() {
    if [[ $1 == *.gz ]]; then gzip -dc -- "$1"; else cat -- "$1"; fi
}

# Short sha256 of a file's content (to tie a step to the exact checkpoint it used).
file_sha() { sha256sum -- "$1" | cut -c1-16; }

# ---- configuration fingerprint and stamps -------------------------------------------------------
STEP_CONFIG=""
config_add() { # config_add KEY VALUE...
    local key=$1
    shift
    STEP_CONFIG+="$key=$*"$'\n'
}

# config_add_nondefault KEY VALUE DEFAULT: config_add only when VALUE differs from DEFAULT, so that a
# flag added to a recipe later does not change the configuration of the directories made before it.
config_add_nondefault() {
    [[ $2 == "$3" ]] || config_add "$1" "$2"
}

# Lines of a stamp file without comments.
_stamp_lines() { grep -v '^#' -- "$1" || true; }

# "key: old -> new; ..." for the keys that differ between a stamp file and STEP_CONFIG (in order).
_config_diff() {
    awk '
        function val(line) { sub(/^[^=]*=/, "", line); return line }
        NR == FNR { if ($0 !~ /^#/ && $0 != "") { k = $0; sub(/=.*/, "", k); old[k] = val($0); order_old[++n_old] = k } next }
        $0 != "" { k = $0; sub(/=.*/, "", k); new[k] = val($0); order_new[++n_new] = k }
        END {
            s = ""
            for (i = 1; i <= n_new; i++) { k = order_new[i]
                if (!(k in old)) s = s sep(s) k ": (unset) -> " new[k]
                else if (old[k] != new[k]) s = s sep(s) k ": " old[k] " -> " new[k] }
            for (i = 1; i <= n_old; i++) { k = order_old[i]
                if (!(k in new)) s = s sep(s) k ": " old[k] " -> (unset)" }
            print s
        }
        function sep(s) { return s == "" ? "" : "; " }
    ' "$1" <(printf '%s' "$STEP_CONFIG")
}

# The value of KEY in a stamp file.
_stamp_get() { sed -n "s/^$2=//p" "$1" | head -n 1; }

# Arguments as one shell-quoted string ("" for none), for fingerprints and log lines.
quote_args() {
    [[ $# -gt 0 ]] || return 0
    local s
    s=$(printf '%q ' "$@")
    printf '%s' "${s% }"
}

stamp_check() { # stamp_check OUT FLAG
    local out=$1 flag=$2 f
    for f in "$out/.done" "$out/.config"; do
        if [[ -f $f ]]; then
            if [[ "$(_stamp_lines "$f")" == "$(printf '%s' "$STEP_CONFIG" | sed '/^$/d')" ]]; then
                [[ $f == */.done ]] && return 0
                log "resuming the interrupted run in $out (same configuration)"
                return 1
            fi
            local made_by
            made_by=$(_stamp_get "$f" recipe)
            [[ -z $made_by || $made_by == "$RECIPE_NAME" ]] ||
                die "$out holds the output of $made_by, not $RECIPE_NAME; choose another $flag"
            die "$out was made with another configuration ($(_config_diff "$f")); delete it or choose another $flag"
        fi
    done
    if [[ -d $out ]] && [[ -n "$(ls -A -- "$out")" ]]; then
        die "$out exists, is not empty and has no stamp (.config/.done), so it was not made by $RECIPE_NAME; delete it or choose another $flag"
    fi
    mkdir -p -- "$out"
    printf '%s' "$STEP_CONFIG" >"$out/.config"
    return 1
}

stamp_done() { # stamp_done OUT [COMMENT...]
    local out=$1
    shift
    {
        printf '%s' "$STEP_CONFIG"
        printf '# finished %s by %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$RECIPE_NAME"
        local c
        for c in "$@"; do printf '# %s\n' "$c"; done
    } >"$out/.done.tmp"
    mv -f -- "$out/.done.tmp" "$out/.done"
}

# Sub-steps inside one output directory (the directory's .config already fixes their configuration).
step_done() { [[ -f $1/.step.$2.done ]]; }
step_mark() { : >"$1/.step.$2.done"; }

# Seconds since the epoch, with fraction, and elapsed time formatting.
now_s() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }
