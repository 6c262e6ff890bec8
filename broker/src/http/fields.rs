//! Control fields of an HTTP request. Each field (`mq`, `group`, `tag`, `timeout`, ...) may be
//! given as a header (the zbus way: control data in headers, payload in the body) or as a
//! query parameter of the same name (so a browser or a bare `curl` needs no custom header).
//! A header wins over a query parameter.

use std::str::FromStr;

use hyper::http::request::Parts;

use super::reply::ApiError;

/// The fields of one request.
#[derive(Debug)]
pub struct Fields<'a> {
    parts: &'a Parts,
    query: Vec<(String, String)>,
}

impl<'a> Fields<'a> {
    /// Reads the query string of `parts`; fails on broken percent-encoding.
    pub fn new(parts: &'a Parts) -> Result<Fields<'a>, ApiError> {
        let query = parse_query(parts.uri.query().unwrap_or(""))?;
        Ok(Fields { parts, query })
    }

    /// The field `name`, if given.
    pub fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        if let Some(value) = self.parts.headers.get(name) {
            // Header values may carry UTF-8 (tags and keys are UTF-8 in the record format).
            return std::str::from_utf8(value.as_bytes())
                .map(|v| Some(v.trim()))
                .map_err(|_| ApiError::bad_request(format!("header {name:?} is not UTF-8")));
        }
        Ok(self
            .query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str()))
    }

    /// The field `name`; an error naming both ways to give it when it is missing or empty.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        match self.get(name)? {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(ApiError::bad_request(format!(
                "missing {name}: give it as the `{name}` header or the `?{name}=` query parameter"
            ))),
        }
    }

    /// The field `name` parsed as a `T`; `what` describes a valid value for the error.
    pub fn parse<T: FromStr>(&self, name: &str, what: &str) -> Result<Option<T>, ApiError> {
        self.get(name)?
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("{name} {value:?} is not {what}")))
            })
            .transpose()
    }
}

/// Splits `a=1&b=x%20y` into decoded pairs (`+` is a space, as HTML forms send it).
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(key)?, percent_decode(value)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("bad percent-encoding in query {text:?}"));
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = hyper::Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn headers_win_over_query_parameters() {
        let p = parts("/?mq=from-query&tag=a%20b+c", &[("mq", "from-header")]);
        let fields = Fields::new(&p).unwrap();
        assert_eq!(fields.get("mq").unwrap(), Some("from-header"));
        assert_eq!(fields.get("tag").unwrap(), Some("a b c"));
        assert_eq!(fields.get("group").unwrap(), None);
    }

    #[test]
    fn missing_and_malformed_fields_say_what_to_do() {
        let p = parts("/?timeout=soon", &[]);
        let fields = Fields::new(&p).unwrap();
        let err = fields.required("mq").unwrap_err().into_reply();
        assert_eq!(err.status(), 400);
        assert!(fields.parse::<u64>("timeout", "milliseconds").is_err());
        assert_eq!(fields.parse::<u64>("count", "a number").unwrap(), None);
        assert!(Fields::new(&parts("/?mq=%zz", &[])).is_err());
        assert!(
            Fields::new(&parts("/?mq=%e2%82", &[])).is_err(),
            "cut UTF-8"
        );
    }
}
