"""Checks that every Kotlin block in a README is code the Kotlin test runs.

The test marks sections with `// README: NAME` ... `// README: end`; each such section must
appear verbatim (after dedenting) as a ```kotlin block of the README, and the README may have
no Kotlin block that is not one of them.

    python3 check_snippets.py README.md Test.kts
"""

import re
import sys
import textwrap


def test_sections(source: str) -> dict:
    sections, name, lines = {}, None, []
    for line in source.splitlines():
        marker = re.match(r"\s*// README: (\S+)\s*$", line)
        if marker and marker.group(1) == "end":
            sections[name] = textwrap.dedent("\n".join(lines)).strip()
            name, lines = None, []
        elif marker:
            name = marker.group(1)
        elif name is not None:
            lines.append(line)
    if name is not None:
        sys.exit(f"section {name} has no '// README: end'")
    return sections


def readme_blocks(text: str) -> list:
    return [b.strip() for b in re.findall(r"```kotlin\n(.*?)```", text, flags=re.S)]


def main() -> None:
    readme_path, test_path = sys.argv[1], sys.argv[2]
    sections = test_sections(open(test_path).read())
    blocks = readme_blocks(open(readme_path).read())
    problems = []
    for name, code in sections.items():
        if code not in blocks:
            problems.append(f"section '{name}' of {test_path} is not a kotlin block of {readme_path}")
    for block in blocks:
        if block not in sections.values():
            first = block.splitlines()[0] if block else ""
            problems.append(f"kotlin block starting '{first}' in {readme_path} is not in {test_path}")
    if not sections:
        problems.append(f"no README sections in {test_path}")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"{len(sections)} snippets match")


if __name__ == "__main__":
    main()
