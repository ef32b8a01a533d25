# Sourced by the guest's /init (busybox sh). The writer's file operations,
# derived only from (SEED, operation number, BIG): replaying operations
# 1..N into an empty directory rebuilds exactly the share as it was after
# operation N, which is how check mode knows what every acknowledged state
# must restore to.
#
# Randomness is a 64-bit LCG in shell arithmetic, reseeded for every
# operation from (SEED, I), so an operation does not depend on how the
# writer grouped operations into batches. Never call these functions in
# $(...): they set global variables.

# rnd: next value into RV, 0 <= RV < 2^31.
rnd() {
	R=$(( R * 6364136223846793005 + 1442695040888963407 ))
	RV=$(( (R >> 33) & 2147483647 ))
}

# pick N: RV uniformly-ish in [0, N).
pick() {
	rnd
	RV=$(( RV % $1 ))
}

# seed_for TAG NUMBER: reseed R from SEED, a tag and a number.
seed_for() {
	R=$(( SEED * 2654435761 + $1 * 1000003 + $2 * 40503 + 17 ))
	rnd; rnd; rnd
}

# gen SIZE: SIZE bytes of content unique to (SEED, I) on stdout.
gen() {
	[ "$1" -gt 0 ] || return 0
	seq $(( RV % 100000 )) $(( RV % 100000 + $1 / 5 + 2 )) | sed "s/^/$SEED.$I./" | head -c "$1"
}

# pick_size: a file size into SZ (empty files included).
pick_size() {
	pick 100
	if [ "$RV" -lt 8 ]; then
		SZ=0
	elif [ "$RV" -lt 45 ]; then
		pick 300; SZ=$(( RV + 1 ))
	elif [ "$RV" -lt $(( 90 - 15 * BIG )) ]; then
		pick 30000; SZ=$(( RV + 1024 ))
	elif [ "$BIG" = 1 ]; then
		pick 1310720; SZ=$(( RV + 262144 ))
	else
		pick 196608; SZ=$(( RV + 65536 ))
	fi
}

# list_files DIR / list_dirs DIR: sorted relative paths (C locale: the
# initramfs has no locales), into FILES / DIRS, counts into NF / ND.
list_files() {
	FILES=$(cd "$1" && find . -type f | sort)
	NF=$(printf '%s\n' "$FILES" | grep -c .)
}
list_dirs() {
	DIRS=$(cd "$1" && find . -mindepth 1 -type d | sort)
	ND=$(printf '%s\n' "$DIRS" | grep -c .)
}
# nth LIST K: the K-th line (1-based) of LIST into NTH.
nth() {
	NTH=$(printf '%s\n' "$1" | sed -n "${2}p")
}
# pick_dir W: a directory of W (its top included) into PD.
pick_dir() {
	list_dirs "$1"
	pick $(( ND + 1 ))
	if [ "$RV" -eq 0 ]; then PD=.; else nth "$DIRS" "$RV"; PD=$NTH; fi
}

# apply_op W I: operation number I on directory W. Sets OPK to its kind.
apply_op() {
	W=$1; I=$2
	seed_for 1 "$I"
	list_files "$W"
	pick 100; K=$RV
	[ "$NF" -eq 0 ] && K=0
	if [ "$K" -lt 34 ]; then
		OPK=create
		pick_dir "$W"; pick_size
		gen "$SZ" > "$W/$PD/f$I"
	elif [ "$K" -lt 50 ]; then
		OPK=overwrite
		pick "$NF"; nth "$FILES" $(( RV + 1 )); pick_size
		gen "$SZ" > "$W/$NTH"
	elif [ "$K" -lt 57 ]; then
		OPK=append
		pick "$NF"; nth "$FILES" $(( RV + 1 )); pick 2000
		gen $(( RV + 1 )) >> "$W/$NTH"
	elif [ "$K" -lt 64 ]; then
		# Office's save: write a temp file (excluded: *.tmp), rename it over
		OPK=replace
		pick "$NF"; nth "$FILES" $(( RV + 1 )); pick_size
		gen "$SZ" > "$W/$NTH.tmp"
		mv -f "$W/$NTH.tmp" "$W/$NTH"
	elif [ "$K" -lt 73 ]; then
		OPK=rename
		pick "$NF"; nth "$FILES" $(( RV + 1 )); F=$NTH
		pick_dir "$W"
		mv "$W/$F" "$W/$PD/r$I"
	elif [ "$K" -lt 81 ]; then
		OPK=delete
		pick "$NF"; nth "$FILES" $(( RV + 1 ))
		rm -f "$W/$NTH"
	elif [ "$K" -lt 88 ]; then
		OPK=mkdir
		pick_dir "$W"
		mkdir "$W/$PD/d$I"
	elif [ "$K" -lt 93 ]; then
		OPK=dirrename
		list_dirs "$W"
		if [ "$ND" -gt 0 ]; then
			pick "$ND"; nth "$DIRS" $(( RV + 1 ))
			mv "$W/$NTH" "$W/$(dirname "$NTH")/D$I"
		fi
	elif [ "$K" -lt 95 ]; then
		OPK=rmdir
		list_dirs "$W"
		if [ "$ND" -gt 0 ]; then
			pick "$ND"; nth "$DIRS" $(( RV + 1 ))
			rm -rf "$W/$NTH"
		fi
	else
		OPK=truncate
		pick "$NF"; nth "$FILES" $(( RV + 1 ))
		: > "$W/$NTH"
	fi
}

# ops_in_batch B: how many operations batch B holds, into NB_OPS (3..8).
ops_in_batch() {
	seed_for 2 "$1"
	pick 6; NB_OPS=$(( RV + 3 ))
}

# manifest DIR: one line per entry (D dir / F file md5 / L link target),
# sorted; *.tmp files are left out (the daemon excludes them by default).
manifest() {
	(
		cd "$1" || exit 1
		find . -mindepth 1 -type d | sort | sed 's/^/D /'
		find . -mindepth 1 -type l | sort | while read -r l; do echo "L $l $(readlink "$l")"; done
		find . -type f ! -name '*.tmp' | sort | xargs -r md5sum | sed 's/^\([0-9a-f]*\)  \(.*\)$/F \2 \1/'
	)
}
