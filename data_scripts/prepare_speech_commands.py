"""Write manifests of a local Speech Commands copy (v0.01 or v0.02; never downloads).

Expects <root>/<word>/<speaker>_nohash_<n>.wav and the validation_list.txt / testing_list.txt
files; folders starting with "_" (background noise) are skipped. Writes train.jsonl,
validation.jsonl and test.jsonl to --out-dir: {"path", "duration", "speaker", "text": word}.

Usage: python data_scripts/prepare_speech_commands.py --root /data/speech_commands_v0.02
Reference: Warden, "Speech Commands: A Dataset for Limited-Vocabulary Speech Recognition"
(arXiv 1804.03209).
"""

import argparse
import os

from _common import check_root, duration, run, text_lines, write


def read_list(path):
    if not os.path.isfile(path):
        return set()
    return {line.strip().replace("\\", "/") for _, line in text_lines(path) if line.strip()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the folder holding one folder per word")
    p.add_argument("--out-dir", default="manifests/speech_commands")
    p.add_argument("--limit", type=int, default=None, help="at most this many files in all")
    args = p.parse_args(argv)
    root = check_root(args.root)
    validation = read_list(os.path.join(root, "validation_list.txt"))
    testing = read_list(os.path.join(root, "testing_list.txt"))
    splits = {"train": [], "validation": [], "test": []}
    count = 0
    for word in sorted(os.listdir(root)):
        folder = os.path.join(root, word)
        if word.startswith(("_", ".")) or not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            if not f.endswith(".wav") or (args.limit is not None and count >= args.limit):
                continue
            rel = f"{word}/{f}"
            split = "validation" if rel in validation else "test" if rel in testing else "train"
            path = os.path.join(folder, f)
            splits[split].append({"path": path, "duration": duration(path), "speaker": f.split("_nohash_")[0], "text": word})
            count += 1
    if count == 0:
        raise SystemExit(f"no <word>/*.wav files found under {root}")
    for split, entries in splits.items():
        write(args.out_dir, f"{split}.jsonl", entries)
    return count


if __name__ == "__main__":
    run(main)
