#!/bin/sh
# node-enter.sh: set up the mini-condor node's namespaces, then run a command in it.
#
# Always started through unshare, which makes the namespaces this script fills in:
#   unshare --mount --propagation private --pid --fork --kill-child=SIGKILL [--uts] -- \
#       /bin/sh node-enter.sh [--root LOWER UPPER WORK MERGED] [--hostname NAME] \
#                             [--bind PATH]... [--env NAME=VALUE]... -- CMD [ARG]...
#
#   --root LOWER UPPER WORK MERGED
#           run CMD in a node root: an overlay of LOWER (the cached Debian root,
#           never written) and UPPER (this pool's writable layer; WORK is overlayfs'
#           scratch folder on the same file system), mounted on MERGED and made "/".
#           Without --root, CMD runs on the host's own tree (host daemons).
#   --hostname NAME   the node's host name (needs unshare --uts)
#   --bind PATH       a host folder bound at the same absolute path in the node
#   --env NAME=VALUE  added to CMD's otherwise empty environment
#
# Why this shape:
# - A private mount namespace keeps every mount below out of the host's mount
#   table; they all disappear when the namespace's last process exits.
# - A PID namespace whose PID 1 is this shell: when PID 1 exits or is killed,
#   the kernel kills every other process of the node, jobs included. So "stop
#   leaves no process behind" is a guarantee, not a best effort. The shell stays
#   PID 1 (CMD runs as its child) because it never changes its credentials: the
#   parent-death signal set by --kill-child survives in it (condor_master
#   switching to the condor user would clear it).
# - pivot_root, not chroot: HTCondor's starter unshares a mount namespace per
#   job, which needs "/" to be a mount point, and Apptainer refuses a chroot.
set -eu

die() {
    echo "node-enter: $*" >&2
    exit 70
}

# Lists below hold one path or NAME=VALUE per line: split on newlines only, never glob.
default_ifs=$IFS
IFS='
'
set -f

[ "$$" = 1 ] || die "must run as PID 1 of a new PID namespace (start it through unshare --pid --fork)"

lower="" upper="" work="" merged="" hostname=""
binds="" envs=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --root)
            [ "$#" -ge 5 ] || die "--root needs LOWER UPPER WORK MERGED"
            lower=$2 upper=$3 work=$4 merged=$5
            shift 5
            ;;
        --hostname)
            [ "$#" -ge 2 ] || die "--hostname needs a name"
            hostname=$2
            shift 2
            ;;
        --bind)
            [ "$#" -ge 2 ] || die "--bind needs a path"
            case "$2" in /*) ;; *) die "--bind path must be absolute: $2" ;; esac
            case "$2" in *"
"*) die "--bind path must not contain a newline" ;; esac
            [ -d "$2" ] || die "--bind path is not a directory: $2"
            binds="$binds$2
"
            shift 2
            ;;
        --env)
            [ "$#" -ge 2 ] || die "--env needs NAME=VALUE"
            case "$2" in *=*) ;; *) die "--env needs NAME=VALUE, got: $2" ;; esac
            envs="$envs$2
"
            shift 2
            ;;
        --)
            shift
            break
            ;;
        *)
            die "unexpected argument: $1"
            ;;
    esac
done
[ "$#" -ge 1 ] || die "no command given after --"

if [ -n "$hostname" ]; then
    # Refuse to rename the host: the name may only change in a UTS namespace of our own.
    [ "$(readlink /proc/self/ns/uts)" != "$(readlink /proc/1/ns/uts)" ] \
        || die "--hostname needs a new UTS namespace (unshare --uts)"
    printf '%s\n' "$hostname" > /proc/sys/kernel/hostname
fi

if [ -n "$lower" ]; then
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged"
    # A fresh proc shows only the node's processes (this PID namespace).
    mount -t proc -o nosuid,nodev,noexec proc "$merged/proc"
    mount --rbind /dev "$merged/dev"
    # A fresh, read-only sysfs carries no cgroup mounts, so HTCondor finds no
    # cgroup hierarchy to manage and never creates cgroups on the host.
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$merged/sys"
    for path in $binds; do  # one path a line (IFS and set -f above)
        mkdir -p "$merged$path"
        mount --bind "$path" "$merged$path"
    done
    cd "$merged"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    # Detach the host's tree: nothing of the host stays reachable but the binds.
    umount -l /.oldroot
    rmdir /.oldroot
else
    # Host daemons: same tree, but a /proc of this PID namespace only.
    mount -t proc -o nosuid,nodev,noexec proc /proc
fi

# CMD gets a clean environment: nothing of the caller's (a host CONDOR_CONFIG,
# say) leaks into the node; the --env pairs come last so they may override.
# CMD runs as a child, not exec'd: see above.
# shellcheck disable=SC2086
set -- /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 $envs "$@"
IFS=$default_ifs
set +e
"$@"
exit "$?"
