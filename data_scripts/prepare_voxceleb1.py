"""Write manifests of a local VoxCeleb1 copy (never downloads).

Expects the usual layout, <root>/[wav/]id10001/<video id>/00001.wav. Writes to --out-dir:
  dev.jsonl    speakers outside the VoxCeleb1-O test set  {"path", "duration", "speaker"}
  test.jsonl   the 40 test speakers id10270..id10309
  trials.jsonl with --trials veri_test2.txt: {"target": bool, "enroll": path, "test": path}

Usage: python data_scripts/prepare_voxceleb1.py --root /data/voxceleb1 --out-dir manifests/vox1
Reference: Nagrani, Chung, Zisserman, "VoxCeleb: a large-scale speaker identification dataset"
(Interspeech 2017).
"""

import argparse
import json
import os
import re

from _common import check_root, duration, run, text_lines, walk_files, write

SPEAKER = re.compile(r"^id\d{5}$")
TEST_SPEAKERS = {f"id{n}" for n in range(10270, 10310)}


def find_utterances(root, limit=None):
    """[(path, speaker, key)] of every .wav below a folder named like id10001, sorted; key is
    the path from the speaker folder on ("id10270/x6uYqmx31kE/00001.wav"), as in the trial lists."""
    found = []
    for folder, f in walk_files(root):
        if not f.lower().endswith(".wav"):
            continue
        parts = os.path.relpath(folder, root).split(os.sep)
        at = next((i for i, p in enumerate(parts) if SPEAKER.match(p)), None)
        if at is not None:
            found.append((os.path.join(folder, f), parts[at], "/".join(parts[at:] + [f])))
            if limit is not None and len(found) >= limit:
                return found
    return found


def read_trials(path):
    """[(target, enroll key, test key)] of a VoxCeleb trial list ("1 id10270/x/00001.wav
    id10270/y/00002.wav"); a malformed line is a ValueError naming path:lineno."""
    out = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: expected '<0|1> <enroll path> <test path>', got {line!r:.80}")
        out.append((parts[0] == "1", parts[1], parts[2]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding the id*/ speaker folders (or wav/id*/)")
    p.add_argument("--out-dir", default="manifests/voxceleb1")
    p.add_argument("--trials", default=None, help="optional veri_test2.txt to convert to trials.jsonl")
    p.add_argument("--limit", type=int, default=None, help="stop after this many files (for a quick look)")
    args = p.parse_args(argv)
    root = check_root(args.root)
    if args.trials is not None and not os.path.isfile(args.trials):
        raise SystemExit(f"--trials must be an existing file (e.g. veri_test2.txt), got {args.trials!r}")
    utts = find_utterances(root, args.limit)
    if not utts:
        raise SystemExit(f"no .wav files under speaker folders (id12345/...) found in {root}")
    entries = {"dev": [], "test": []}
    for path, spk, _ in utts:
        split = "test" if spk in TEST_SPEAKERS else "dev"
        entries[split].append({"path": path, "duration": duration(path), "speaker": spk})
    for split, es in entries.items():
        if es:
            write(args.out_dir, f"{split}.jsonl", es)
    if args.trials:
        by_rel = {key: path for path, _, key in utts}
        trials, missing = [], 0
        for target, a, b in read_trials(args.trials):
            if a in by_rel and b in by_rel:
                trials.append({"target": target, "enroll": by_rel[a], "test": by_rel[b]})
            else:
                missing += 1
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "trials.jsonl"), "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in trials)
        print(f"wrote {len(trials)} trials ({missing} skipped: files not found under --root)")
    return sum(len(es) for es in entries.values())


if __name__ == "__main__":
    run(main)
