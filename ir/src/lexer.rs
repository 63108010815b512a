//! Tokens of the IR text form, each with its 1-based line and column.

use crate::error::IrError;

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    /// `graph`, `seq`, `f32`, op keywords, attribute words.
    Ident(String),
    /// `%name`
    Value(String),
    /// `@name`
    Global(String),
    /// `#name`
    Hash(String),
    Int(i128),
    Float(f64),
    Str(String),
    Punct(char),
    Eof,
}

impl Tok {
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("`{s}`"),
            Tok::Value(s) => format!("`%{s}`"),
            Tok::Global(s) => format!("`@{s}`"),
            Tok::Hash(s) => format!("`#{s}`"),
            Tok::Int(v) => format!("`{v}`"),
            Tok::Float(v) => format!("`{v}`"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Punct(c) => format!("`{c}`"),
            Tok::Eof => "end of input".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Token {
    pub tok: Tok,
    pub line: u32,
    pub col: u32,
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// Splits text into tokens; `//` starts a comment to the end of the line.
pub fn tokenize(src: &str) -> Result<Vec<Token>, IrError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1u32, 1u32);
    let err = |line, col, message: String| IrError::Parse { line, col, message };
    while i < chars.len() {
        let c = chars[i];
        let (tl, tc) = (line, col);
        let advance = |i: &mut usize, col: &mut u32, n: usize| {
            *i += n;
            *col += n as u32;
        };
        if c == '\n' {
            i += 1;
            line += 1;
            col = 1;
            continue;
        }
        if c.is_whitespace() {
            advance(&mut i, &mut col, 1);
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if matches!(c, '%' | '@' | '#') {
            let start = i + 1;
            let mut j = start;
            while j < chars.len() && is_ident_char(chars[j]) {
                j += 1;
            }
            if j == start {
                return Err(err(tl, tc, format!("expected a name after `{c}`")));
            }
            let name: String = chars[start..j].iter().collect();
            out.push(Token {
                tok: match c {
                    '%' => Tok::Value(name),
                    '@' => Tok::Global(name),
                    _ => Tok::Hash(name),
                },
                line: tl,
                col: tc,
            });
            let n = j - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        if c == '"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match chars.get(j) {
                    None | Some('\n') => return Err(err(tl, tc, "unterminated string".into())),
                    Some('"') => break,
                    Some('\\') => {
                        match chars.get(j + 1) {
                            Some('"') => s.push('"'),
                            Some('\\') => s.push('\\'),
                            Some('n') => s.push('\n'),
                            other => return Err(err(tl, tc + (j - i) as u32, format!("bad escape `\\{}`", other.copied().unwrap_or(' ')))),
                        }
                        j += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        j += 1;
                    }
                }
            }
            out.push(Token { tok: Tok::Str(s), line: tl, col: tc });
            let n = j + 1 - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        let starts_number =
            c.is_ascii_digit() || ((c == '-' || c == '+') && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == '.'));
        if starts_number {
            let mut j = i + 1;
            while j < chars.len() {
                let d = chars[j];
                let exp_sign = (d == '-' || d == '+') && matches!(chars[j - 1], 'e' | 'E');
                if d.is_ascii_alphanumeric() || d == '.' || exp_sign {
                    j += 1;
                } else {
                    break;
                }
            }
            let text: String = chars[i..j].iter().collect();
            let tok = if text.contains(['.', 'e', 'E']) || text.contains("inf") || text.contains("NaN") {
                text.parse::<f64>().map(Tok::Float).map_err(|_| err(tl, tc, format!("malformed number `{text}`")))?
            } else {
                text.parse::<i128>().map(Tok::Int).map_err(|_| err(tl, tc, format!("malformed number `{text}`")))?
            };
            out.push(Token { tok, line: tl, col: tc });
            let n = j - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let mut j = i;
            while j < chars.len() && is_ident_char(chars[j]) {
                j += 1;
            }
            let word: String = chars[i..j].iter().collect();
            let tok = match word.as_str() {
                "inf" => Tok::Float(f64::INFINITY),
                "NaN" => Tok::Float(f64::NAN),
                _ => Tok::Ident(word),
            };
            out.push(Token { tok, line: tl, col: tc });
            let n = j - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        if matches!(c, '=' | ',' | ':' | '[' | ']' | '{' | '}' | '(' | ')') {
            out.push(Token { tok: Tok::Punct(c), line: tl, col: tc });
            advance(&mut i, &mut col, 1);
            continue;
        }
        return Err(err(tl, tc, format!("unexpected character `{c}`")));
    }
    out.push(Token { tok: Tok::Eof, line, col });
    Ok(out)
}
