"""Chat templates in the shapes models ship them (ChatML, Llama 2, Zephyr, Gemma, a Llama 3 style one with
namespace, generation tags, tojson, format and filters), for tests that compare mistudio's rendering with
transformers' ``apply_chat_template``."""

SIMPLE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

LLAMA3ISH = """{{- bos_token }}
{%- set ns = namespace(system='', n=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{%- set ns.system = ns.system ~ m.content|trim %}{%- set ns.n = ns.n + 1 %}{%- endif %}
{%- endfor %}
{%- if ns.system %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' ~ ns.system ~ '<|eot_id|>' }}
{%- endif %}
{%- for m in messages | rejectattr('role', 'equalto', 'system') %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if m.role == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}
    {%- else %}{{ m['content'] | trim }}{%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{{- '<!-- ' ~ (messages | map(attribute='role') | list | tojson) ~ ' ' ~ ("%d of %s"|format(ns.n, messages|length))
    ~ ' {0}/{1:>3}'.format(messages|length, loop_count|default(0)) ~ ' ' ~ (messages|selectattr('role', 'equalto',
    'user')|map(attribute='content')|join(' | '))[:40] ~ ' ' ~ dict(a=1, b=[1, 2])|dictsort|string ~ ' -->' }}
{%- for i in range(messages|length * 3) if i is divisibleby 2 %}{{ loop.index }}{% if not loop.last %},{% endif %}{% endfor %}"""

TEMPLATES = {"simple": SIMPLE, "chatml": CHATML, "llama2": LLAMA2, "zephyr": ZEPHYR, "gemma": GEMMA,
             "llama3ish": LLAMA3ISH}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
