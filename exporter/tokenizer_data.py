"""Embedded data for the tiny test tokenizer: a small English + code corpus and the chat template.

Everything here is plain text so that tokenizer training is deterministic and needs no download.
"""
from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Special tokens, in the order they are appended after the BPE vocabulary (Qwen puts them last too).
# (content, special) -- `special=False` mirrors Qwen, whose <think> tags are added tokens that are
# *not* skipped by `decode(skip_special_tokens=True)`.
# --------------------------------------------------------------------------------------------------
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<think>", False),
    ("</think>", False),
]

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of a language.
Once upon a time there was a little robot who wanted to write poems about the sea and the stars.
Every morning the robot woke up, looked at the sky, and counted the clouds one by one.
"Why do you count the clouds?" asked the cat. "Because numbers help me think," said the robot.
The weather today is sunny with a light breeze from the west. Tomorrow it will rain in the evening.
Please explain how a neural network learns. First, it makes a guess; then it measures the error;
finally it changes its weights a little so that the next guess is better. This is called training.
A hybrid model mixes two kinds of layers: linear attention layers that keep a fixed-size state, and
full attention layers that look at every previous token. The state of a linear layer is updated by a
gated delta rule, so memory does not grow with the length of the conversation.
Questions and answers:
Q: What is the capital of France? A: The capital of France is Paris.
Q: How many days are in a week? A: There are seven days in a week.
Q: What is two plus three? A: Two plus three is five.
Q: Can you help me write a function? A: Of course! Tell me what the function should do.
I think, therefore I am. To be or not to be, that is the question. All that glitters is not gold.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
Let me think step by step. The user wants a short answer, so I should be brief and clear.
Okay, so the problem is asking for the sum of the first ten numbers. That is fifty-five.
Thank you for your question. Here is a summary of the main points, followed by an example.
The café served crème brûlée and a naïve jalapeño salad. Façade, résumé, déjà vu, über.
Hello world! 你好，世界。こんにちは。Привет, мир! 🙂 🚀 ✨
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1e-6 0x1F 255 65536.
"""

CODE = '''\
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Tokenizer:
    def __init__(self, vocab, merges):
        self.vocab = dict(vocab)
        self.merges = list(merges)

    def encode(self, text):
        ids = []
        for word in text.split():
            ids.append(self.vocab.get(word, 0))
        return ids


def main():
    import json
    import sys
    data = json.load(sys.stdin)
    for key, value in sorted(data.items()):
        print(f"{key}: {value}")
    if not data:
        raise ValueError("empty input")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%d: %s\\n", i, argv[i]);
    }
    return 0;
}

function add(a, b) {
  return a + b;
}
const items = [1, 2, 3].map((x) => x * 2);
console.log(JSON.stringify({ items, total: items.reduce(add, 0) }));

SELECT name, COUNT(*) AS n FROM users WHERE active = 1 GROUP BY name ORDER BY n DESC;
$ pip install numpy && python -m pytest -q tests/
{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}
'''

CHAT = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
<think>
The user asks about geography. The answer is Paris.
</think>

The capital of France is Paris.<|im_end|>
<|im_start|>user
Write a Python function that adds two numbers.<|im_end|>
<|im_start|>assistant
<think>

</think>

def add(a, b):
    return a + b<|im_end|>
"""

CORPUS: list[str] = [ENGLISH, CODE, CHAT]


# --------------------------------------------------------------------------------------------------
# Chat template: Qwen3-style ChatML with reasoning handling (Qwen3 / Qwen3.6 conventions):
# * `<|im_start|>{role}\n{content}<|im_end|>\n` per message; a leading system message (or tools).
# * assistant reasoning comes from `reasoning_content` or from `<think>...</think>` inline in content.
# * reasoning of assistant turns before the last user query is dropped unless `preserve_thinking`.
# * `add_generation_prompt` appends `<|im_start|>assistant\n`, followed by an empty think block when
#   `enable_thinking` is false.
# --------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if (preserve_thinking is defined and preserve_thinking is true) or loop.index0 > ns.last_query_index %}
            {%- if loop.last or reasoning_content %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
