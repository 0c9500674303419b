"""Chat formats for tokenizers that have no chat template (base models such as Gemma 3 270M).

Chat rows need a chat template to be rendered; a base model's tokenizer usually has none. qlorakit
then gives it one, chosen by `data.template`:

    chatml   ChatML, the format TRL's `setup_chat_format` adds:
                 <|im_start|>{role}\\n{content}<|im_end|>\\n ...  <|im_start|>assistant\\n
             (the markers are plain text unless the vocabulary has them as tokens; no
             embedding is resized)
    gemma    the Gemma family's own turns, over the tokens its vocabulary already has:
                 <bos><start_of_turn>user\\n{content}<end_of_turn>\\n ... <start_of_turn>model\\n
             (a system turn is put before the first user turn's text, as Gemma's own template does)
    auto     the family's own format where the vocabulary has its turn tokens (`gemma` for
             <start_of_turn>/<end_of_turn>), else `chatml`; training says which in one line

The template chosen is saved with the run (adapter/chat_template.jinja), restored with it, and
written into merged directories (the tokenizer's chat_template.jinja) and merged GGUF files
(`tokenizer.chat_template`), so the result chats as it was trained.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set prefix = system if loop.first else '' %}"
    "{{ '<start_of_turn>' + role + '\\n' + prefix + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

CHAT_FORMATS = {"chatml": CHATML, "gemma": GEMMA}
FILENAME = "chat_template.jinja"  # transformers' own file name for a tokenizer's chat template


def family_chat_format(tokenizer) -> str:
    """`gemma` when the vocabulary has Gemma's turn tokens, else `chatml`."""
    vocab = tokenizer.get_vocab()
    return "gemma" if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab else "chatml"


def give_chat_format(tokenizer, name: str) -> None:
    """Set `tokenizer.chat_template` to format `name` ("chatml", "gemma", or "auto": `family_chat_format`)."""
    if name == "auto":
        name = family_chat_format(tokenizer)
    tokenizer.chat_template = CHAT_FORMATS[name]
