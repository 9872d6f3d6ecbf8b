//! Guards in front of the YAML parser, for every YAML file palisade reads from outside
//! (inventory, NetworkPolicies): size and nesting depth are checked BEFORE the parser sees the
//! text, and a UTF-8 byte-order mark is accepted.
//!
//! Why before: the parser's cost is not linear in what an attacker controls. 100,000 nested `[`
//! took seconds before the deserializer's recursion limit stopped it (the whole event stream is
//! built first), so a limit inside the parser is too late. [`check_depth`] is one linear pass.

use std::io::Read;
use std::path::Path;

/// The deepest nesting of YAML collections (block and flow) accepted. Palisade's documents
/// are shallow: a NetworkPolicy's deepest path
/// (`spec.ingress[].from[].podSelector.matchExpressions[].values[]`) is 10 levels, an
/// inventory's 5.
pub const MAX_YAML_DEPTH: usize = 32;

/// A YAML input past a limit, or unreadable. Callers wrap it with the file name.
#[derive(Debug, thiserror::Error)]
pub enum YamlInputError {
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    #[error("file is {size} bytes, more than the {limit} allowed")]
    TooLarge { size: u64, limit: u64 },
    #[error("line {line} column {column}: nesting deeper than {limit} levels")]
    TooDeep { line: usize, column: usize, limit: usize },
}

/// Reads a UTF-8 file of at most `limit` bytes; a larger one is refused without reading past
/// the limit (also when it grows while being read, or is a pipe with no size).
pub fn read_limited(path: &Path, limit: u64) -> Result<String, YamlInputError> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > limit {
        return Err(YamlInputError::TooLarge { size, limit });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(YamlInputError::TooLarge { size: bytes.len() as u64, limit });
    }
    String::from_utf8(bytes).map_err(|e| YamlInputError::Read(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// The text without a leading UTF-8 byte-order mark (editors on some systems write one; it is
/// not part of the document).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Size and depth check of a text before parsing.
pub fn check(text: &str, size_limit: u64) -> Result<(), YamlInputError> {
    if text.len() as u64 > size_limit {
        return Err(YamlInputError::TooLarge { size: text.len() as u64, limit: size_limit });
    }
    check_depth(text, MAX_YAML_DEPTH)
}

/// One linear pass over the text measuring collection nesting: block collections by
/// indentation (and compact `- - x` items), flow collections by brackets outside quoted
/// scalars, comments and block scalars. It never undercounts what the parser will nest: a
/// bracket in the middle of a plain scalar (`a[b`) is text to the parser and is not counted, but
/// a bracket where a scalar could start is.
// Long on purpose (~130 lines): one state machine in one loop, its states sharing the loop's
// locals; the single linear pass is the guarantee this guard exists for.
pub fn check_depth(text: &str, limit: usize) -> Result<(), YamlInputError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    // Block collections open: (column, is a sequence).
    let mut block: Vec<(usize, bool)> = Vec::new();
    let mut block_depth = 0usize;
    let mut flow = 0usize;
    let mut quote = Quote::None;
    // Inside a block scalar (`|`/`>`): lines indented deeper than this column are its text.
    let mut block_scalar: Option<usize> = None;
    let too_deep = |line: usize, column: usize| YamlInputError::TooDeep { line, column, limit };
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let number = index + 1;
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let blank = bytes[indent..].iter().all(|b| *b == b' ' || *b == b'\t');
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let mut at = indent;
        if quote == Quote::None && flow == 0 {
            if blank || bytes.get(indent) == Some(&b'#') {
                continue;
            }
            if indent == 0 && (line.starts_with("---") || line.starts_with("...") || line.starts_with('%')) {
                block.clear();
                block_depth = 0;
                at = 3.min(bytes.len());
            } else {
                let indicator = |at: usize| matches!(bytes.get(at), Some(b'-' | b'?')) && matches!(bytes.get(at + 1), Some(b' ') | None);
                let sequence_line = indicator(indent);
                while let Some(&(column, sequence)) = block.last() {
                    // A sequence may sit at its parent key's indentation: not a sibling.
                    if column < indent || (column == indent && sequence_line && !sequence) {
                        break;
                    }
                    block.pop();
                }
                // One level per `- `/`? ` item indicator (compact `- - x` nests), one for the
                // collection the content after them is in.
                while indicator(at) {
                    block.push((at, true));
                    at += 1;
                    while at < bytes.len() && bytes[at] == b' ' {
                        at += 1;
                    }
                }
                if at < bytes.len() && bytes[at] != b'#' {
                    block.push((at, false));
                }
                block_depth = block.len();
                if block_depth + flow > limit {
                    return Err(too_deep(number, at + 1));
                }
            }
        }
        // The rest of the line: quotes, flow brackets, comments, a block scalar indicator.
        // `scalar_start`: a quote or bracket here begins a scalar or collection (not the
        // middle of a plain scalar).
        let mut scalar_start = true;
        let mut i = at;
        while i < bytes.len() {
            let b = bytes[i];
            match quote {
                Quote::Single => {
                    if b == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 1;
                        } else {
                            quote = Quote::None;
                            scalar_start = false;
                        }
                    }
                }
                Quote::Double => {
                    if b == b'\\' {
                        i += 1;
                    } else if b == b'"' {
                        quote = Quote::None;
                        scalar_start = false;
                    }
                }
                Quote::None => match b {
                    b' ' | b'\t' => {}
                    b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => break,
                    b'&' | b'!' if scalar_start => {
                        // An anchor or a tag: a node follows it, so a bracket after it still
                        // opens a collection.
                        while i + 1 < bytes.len() && !matches!(bytes[i + 1], b' ' | b'\t' | b'[' | b']' | b'{' | b'}' | b',') {
                            i += 1;
                        }
                    }
                    b'\'' if scalar_start => quote = Quote::Single,
                    b'"' if scalar_start => quote = Quote::Double,
                    b'[' | b'{' if scalar_start || flow > 0 => {
                        flow += 1;
                        if block_depth + flow > limit {
                            return Err(too_deep(number, i + 1));
                        }
                        scalar_start = true;
                    }
                    b']' | b'}' if flow > 0 => {
                        flow -= 1;
                        scalar_start = false;
                    }
                    b',' if flow > 0 => scalar_start = true,
                    b':' | b'-' | b'?' if matches!(bytes.get(i + 1), Some(b' ' | b'\t') | None) => scalar_start = true,
                    b'|' | b'>' if scalar_start && flow == 0 => {
                        // A block scalar header (`|`, `>-`, `|2+`, then maybe a comment): the
                        // following more-indented lines are its text.
                        let rest = line[i + 1..].trim_start_matches(|c: char| c == '-' || c == '+' || c.is_ascii_digit());
                        let rest = rest.trim_start();
                        if rest.is_empty() || rest.starts_with('#') {
                            block_scalar = Some(indent);
                            break;
                        }
                        scalar_start = false;
                    }
                    _ => scalar_start = false,
                },
            }
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(text: &str) -> Option<(usize, usize)> {
        match check_depth(text, MAX_YAML_DEPTH) {
            Ok(()) => None,
            Err(YamlInputError::TooDeep { line, column, .. }) => Some((line, column)),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn deep_flow_block_and_compact_nesting_is_refused_with_its_position() {
        let flow = "[".repeat(100_000);
        // The line itself is one level (a top-level collection), each `[` one more.
        assert_eq!(depth_error(&flow), Some((1, MAX_YAML_DEPTH)));
        let braces = format!("a: {}", "{x: ".repeat(50));
        assert!(depth_error(&braces).is_some());
        let compact = format!("{}x\n", "- ".repeat(100));
        assert!(depth_error(&compact).is_some());
        let mut indented = String::new();
        for level in 0..40 {
            indented.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        assert_eq!(depth_error(&indented).map(|(line, _)| line), Some(MAX_YAML_DEPTH + 1));
        // Behind an anchor or a tag, a bracket still opens a collection.
        for prefix in ["a: &x ", "a: !!seq ", "- &x !t ", "&x ", "a: &x", "[&x"] {
            assert!(depth_error(&format!("{prefix}{}", "[".repeat(1000))).is_some(), "{prefix}");
        }
        // Flow nesting that spans lines, inside block nesting.
        let spanning = format!("a:\n  b: {}\n", "[\n".repeat(40));
        assert!(depth_error(&spanning).is_some());
    }

    #[test]
    fn brackets_in_scalars_comments_and_block_scalars_are_text() {
        let many = "[".repeat(200);
        let texts = [
            format!("a: '{many}'\n"),
            format!("a: \"{many}\\\" {many}\"\n"),
            format!("a: x{many}\n"),
            format!("a: 1 # {many}\n"),
            format!("# {many}\nb: 2\n"),
            format!("a: |\n  {many}\n   {many}\nb: 2\n"),
            format!("a: >-\n\n  {many}\nb: [1, 2]\n"),
            format!("a: 'it''s {many}'\n"),
            "a: don't [x\nb: [1, {c: 2}]\n".to_string(),
        ];
        for text in texts {
            assert_eq!(depth_error(&text), None, "{text}");
        }
    }

    #[test]
    fn real_documents_pass() {
        for text in [
            crate::defaults::DEFAULT_INVENTORY,
            include_str!("../../policies/webapp-netpol.yaml"),
            include_str!("../../policies/webapp-inventory.yaml"),
        ] {
            check(text, u64::MAX).expect("a real document is within the limits");
        }
        // The deepest NetworkPolicy path: 10 levels.
        let deep = "spec:\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions:\n        - key: a\n          operator: In\n          values: [x, y]\n";
        check_depth(deep, 10).expect("10 levels");
        assert!(check_depth(deep, 9).is_err(), "the measure is not an undercount");
    }

    #[test]
    fn size_is_checked_before_reading_and_bom_is_stripped() {
        let dir = std::env::temp_dir().join(format!("palisade-yaml-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("big.yaml");
        std::fs::write(&path, "a: 1\n".repeat(100)).expect("write");
        assert!(matches!(read_limited(&path, 499), Err(YamlInputError::TooLarge { size: 500, limit: 499 })));
        assert_eq!(read_limited(&path, 500).expect("at the limit").len(), 500);
        assert!(matches!(check("abc", 2), Err(YamlInputError::TooLarge { size: 3, limit: 2 })));
        assert_eq!(strip_bom("\u{feff}kind: x"), "kind: x");
        assert_eq!(strip_bom("kind: x"), "kind: x");
        std::fs::remove_dir_all(&dir).ok();
    }
}
