"""Write manifests of a local LibriSpeech copy (never downloads).

Expects <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside the .flac files
(root is the LibriSpeech/ folder; a subset folder itself also works). Writes one
<out-dir>/<subset>.jsonl per subset: {"path", "duration", "speaker", "text"}. ManifestDataset
maps the text to character tokens (blank, space, apostrophe, a-z).

Usage: python data_scripts/prepare_librispeech.py --root /data/LibriSpeech --subsets dev-clean
Reference: Panayotov et al., "LibriSpeech: an ASR corpus based on public domain audio books"
(ICASSP 2015).
"""

import argparse
import os
import re

from _common import check_root, duration, run, text_lines, walk_files, write

UTTERANCE = re.compile(r"^[^\s-]+-[^\s-]+-[^\s-]+$")  # <speaker>-<chapter>-<utterance>


def read_transcripts(path):
    """[(utterance id, text)] of a <speaker>-<chapter>.trans.txt; a malformed line is a
    ValueError naming path:lineno."""
    out = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        utt, _, text = line.strip().partition(" ")
        if not UTTERANCE.match(utt) or not text.strip():
            raise ValueError(f"{path}:{lineno}: expected '<speaker>-<chapter>-<utterance> <TEXT>', got {line!r:.80}")
        out.append((utt, text.strip()))
    return out


def find_subsets(root):
    """Subset folders under root (or [root] if root is itself a subset)."""
    def has_transcripts(d):
        for _, _, files in os.walk(d):
            if any(f.endswith(".trans.txt") for f in files):
                return True
        return False

    subs = [os.path.join(root, d) for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    subs = [d for d in subs if not os.path.basename(d).isdigit() and has_transcripts(d)]
    return subs or [root]


def subset_entries(folder, limit=None):
    entries = []
    for d, f in walk_files(folder):
        if not f.endswith(".trans.txt"):
            continue
        for utt, text in read_transcripts(os.path.join(d, f)):
            path = os.path.join(d, utt + ".flac")
            if not os.path.isfile(path):
                continue
            entries.append({"path": path, "duration": duration(path), "speaker": utt.split("-")[0], "text": text})
            if limit is not None and len(entries) >= limit:
                return entries
    return entries


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the LibriSpeech/ folder (or one subset folder)")
    p.add_argument("--subsets", nargs="*", default=None, help="e.g. train-clean-100 dev-clean (default: all found)")
    p.add_argument("--out-dir", default="manifests/librispeech")
    p.add_argument("--limit", type=int, default=None, help="at most this many utterances per subset")
    args = p.parse_args(argv)
    root = check_root(args.root)
    subsets = find_subsets(root)
    if args.subsets:
        wanted = set(args.subsets)
        subsets = [s for s in subsets if os.path.basename(s) in wanted]
        missing = wanted - {os.path.basename(s) for s in subsets}
        if missing:
            raise SystemExit(f"--subsets not found under {root}: {sorted(missing)}")
    total = 0
    for s in subsets:
        entries = subset_entries(s, args.limit)
        if not entries:
            print(f"no transcribed .flac files in {s}; skipped")
            continue
        write(args.out_dir, os.path.basename(s) + ".jsonl", entries)
        total += len(entries)
    if total == 0:
        raise SystemExit(f"no LibriSpeech utterances found under {root}")
    return total


if __name__ == "__main__":
    run(main)
