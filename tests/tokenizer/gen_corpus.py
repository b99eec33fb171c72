#!/usr/bin/env python3
"""Deterministic tokenizer parity corpus: English, Chinese, code, emoji, whitespace
edge cases, special tokens, random UTF-8 and long runs. `gen_corpus.py > corpus.jsonl`
writes one JSON string per line; the committed corpus.jsonl is this script's output
for SEED, and parity.py checks that it still is."""
import json
import random
import sys

SEED = 20240611

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from "
         "or one had by word but not what all were we when your can said there use an each which she "
         "do how their if will up other about out many then them these so some her would make like him "
         "into time has look two more write go see number no way could people my than first water been "
         "call who oil its now find long down day did get come made may part model token cluster shard "
         "inference pipeline tensor gradient attention embedding latency throughput Hello World OpenBMB "
         "MiniCPM transformer don't isn't it's we're I'm naïve café résumé coöperate façade").split()
HAN = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
       "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好"
       "应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命"
       "此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老"
       "头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即"
       "保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安"
       "场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉"
       "林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸"
       "历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包"
       "火住调满县局照参红细引听该铁价严龙飞你好世界人工智能模型推理分布式计算")
PUNCT_ZH = "，。！？、：；“”《》（）【】…—～·「」"
SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|tool_call|>", "<|execute_start|>",
            "<|execute_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
NEAR_SPECIALS = ["<|im_start", "im_end|>", "<s", "s>", "</s", "<<s>>", "<|im_end|>|>", "<||>", "<|",
                 "|>", "< s>", "<S>", "<|IM_START|>", "<unk", "<|tool_call_start|>", "<|thought_start|>",
                 "<用户>", "<AI>", "<SEP>", "<CLS>", "<b>", "</p>", "<reserved_12>", "<0x41>", "<0xE4>"]
EMOJI = ["😀", "😂", "🥲", "👍", "👍🏽", "❤️", "🇨🇳", "🇺🇸", "👨‍👩‍👧‍👦", "🧑‍💻", "1️⃣", "#️⃣", "🏳️‍🌈",
         "🐉", "🀄", "🫠", "🦀", "✨", "☕", "⌚", "👩🏿‍🔬", "🤖", "🚀", "🎉"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"hi\\n\"); return 0; }",
    "const x = {a: 1, b: [2, 3]};\nconsole.log(JSON.stringify(x));",
    "<html><body><p>Hello</p><b>bold</b><br/><table><tr><td>1</td></tr></table></body></html>",
    "```python\nprint('hello')\n```",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "{\"name\": \"MiniCPM\", \"vocab_size\": 73448, \"tie\": false, \"eps\": 1e-06}",
    "x += 1; y -= 2; z == 3; w != 4; a <= b; c >= d; e => f; g -> h; i :: j",
    "<!-- comment --> <!DOCTYPE> --- ... 。。。 ***",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n}\n",
    "if __name__ == '__main__':\n\tmain()\r\n",
    "$ ls -la /usr/bin | grep -E '^d' && echo \"done\" > /dev/null 2>&1",
    "// C++ template\ntemplate <typename T> T max(T a, T b) { return a > b ? a : b; }",
]
WS = ["", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t\n", "\u3000", "\u00a0", " \u00a0 ",
      "\u2581", "\u2581\u2581", " \u2581 ", "\u200b", "\ufeff", "\x0b", "\x0c", "\x00", "\r", "\u2028",
      "\u2029", "\x85", "\x1f"]
RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0xFF), (0x100, 0x24F), (0x300, 0x36F),
          (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
          (0x1100, 0x11FF), (0x2000, 0x206F), (0x2500, 0x259F), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
          (0xAC00, 0xD7A3), (0xE000, 0xF8FF), (0xFE00, 0xFE0F), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF),
          (0x10000, 0x1007F), (0x1F000, 0x1FAFF), (0x20000, 0x2A6DF), (0xE0000, 0xE007F),
          (0xF0000, 0xF00FF), (0x10FF00, 0x10FFFF)]


def rand_cp(r):
    lo, hi = r.choice(RANGES)
    cp = r.randint(lo, hi)
    return chr(cp) if not 0xD800 <= cp <= 0xDFFF else "?"


def english(r):
    n = r.randint(1, 25)
    ws = [r.choice(WORDS) for _ in range(n)]
    if r.random() < 0.5:
        ws[0] = ws[0].capitalize()
    if r.random() < 0.3:
        ws.insert(r.randint(0, len(ws)), str(r.randint(0, 10 ** r.randint(1, 9))))
    s = " ".join(ws)
    return s + r.choice([".", "!", "?", ",", "", "...", ";", ":"])


def chinese(r):
    out = []
    for _ in range(r.randint(1, 40)):
        out.append(r.choice(HAN) if r.random() < 0.85 else r.choice(PUNCT_ZH))
    return "".join(out)


def mixed(r):
    parts = [english(r) if r.random() < 0.5 else chinese(r) for _ in range(r.randint(2, 5))]
    return r.choice([" ", "", "\n", "，"]).join(parts)


def emoji(r):
    parts = []
    for _ in range(r.randint(1, 8)):
        k = r.random()
        parts.append(r.choice(EMOJI) if k < 0.6 else r.choice(WORDS) if k < 0.8 else r.choice(HAN))
    return r.choice(["", " "]).join(parts)


def whitespace(r):
    parts = [r.choice(WS) for _ in range(r.randint(1, 5))]
    if r.random() < 0.6:
        parts.insert(r.randint(0, len(parts)), r.choice(WORDS + list(HAN[:50])))
    return "".join(parts)


def specials(r):
    parts = []
    for _ in range(r.randint(1, 8)):
        k = r.random()
        if k < 0.35:
            parts.append(r.choice(SPECIALS))
        elif k < 0.5:
            parts.append(r.choice(NEAR_SPECIALS))
        elif k < 0.7:
            parts.append(r.choice(WORDS))
        elif k < 0.8:
            parts.append(r.choice(WS))
        else:
            parts.append(chinese(r)[:6])
    return r.choice(["", " ", "\n"]).join(parts)


def chat_prompt(r):
    turns = []
    for _ in range(r.randint(1, 3)):
        role = r.choice(["user", "assistant", "system", "tool"])
        body = mixed(r) if r.random() < 0.5 else english(r)
        turns.append("<|im_start|>%s\n%s<|im_end|>\n" % (role, body))
    if r.random() < 0.5:
        turns.append("<|im_start|>assistant\n")
    if r.random() < 0.3:
        return "<用户>" + chinese(r) + "<AI>" + english(r)
    return "".join(turns)


def random_utf8(r):
    return "".join(rand_cp(r) for _ in range(r.randint(1, 30)))


def code(r):
    s = r.choice(CODE)
    if r.random() < 0.3:
        s = s.replace("    ", "\t")
    if r.random() < 0.3:
        s = s * r.randint(2, 3)
    return s


def numbers(r):
    k = r.randint(0, 7)
    if k == 0:
        return str(r.randint(0, 10 ** 12))
    if k == 1:
        return "%.*f" % (r.randint(0, 6), r.uniform(-1e6, 1e6))
    if k == 2:
        return "2024-%02d-%02d %02d:%02d" % (r.randint(1, 12), r.randint(1, 28), r.randint(0, 23), r.randint(0, 59))
    if k == 3:
        return "https://example.com/%s?q=%s&n=%d" % (r.choice(WORDS), r.choice(WORDS), r.randint(0, 999))
    if k == 4:
        return "".join(chr(0xFF10 + r.randint(0, 9)) for _ in range(r.randint(1, 8)))  # full-width digits
    if k == 5:
        return "%s@%s.org" % (r.choice(WORDS), r.choice(WORDS))
    if k == 6:
        return "".join(r.choice("+-=.!?…·") for _ in range(r.randint(1, 12)))
    return "第%d章 共%d元" % (r.randint(1, 99), r.randint(1, 9999))


def long_runs(r):
    unit = r.choice(["a", " ", "你", "\u2581", "\n", "ab", "😀", "0", ".", "-", "=", "\t", "é", "e\u0301",
                     "<s>", "<|im_end|>", " a", "\u3000", "\x00", "\U0010FFFF", "啊", "?!"])
    return unit * r.randint(50, 1200)


CATEGORIES = [(english, 300), (chinese, 280), (mixed, 200), (code, 120), (emoji, 150), (whitespace, 150),
              (specials, 250), (chat_prompt, 120), (random_utf8, 320), (numbers, 150), (long_runs, 60)]


def generate(seed=SEED):
    r = random.Random(seed)
    out = list(WS) + SPECIALS + NEAR_SPECIALS + EMOJI + CODE
    out += ["Hello, world! 你好，MiniCPM。", "你好，世界！", "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"]
    for fn, n in CATEGORIES:
        out += [fn(r) for _ in range(n)]
    return out


def main():
    for s in generate(int(sys.argv[1]) if len(sys.argv) > 1 else SEED):
        sys.stdout.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
