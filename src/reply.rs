//! Every reply pubwarden writes itself, in one place, worded as Redis words
//! them where Redis has a word for it.

use bytes::Bytes;

/// Sent to a client whose connection cannot be relayed because Redis is not
/// reachable. Names the address and the cause, never credentials.
pub fn upstream_unavailable(address: &str, cause: &str) -> Bytes {
    Bytes::from(format!(
        "-ERR pubwarden: upstream Redis at {address} is unavailable ({})\r\n",
        one_line(cause)
    ))
}

/// SUBSCRIBE beyond `limits.max_subscriptions`; nothing of it is subscribed.
pub fn too_many_subscriptions(max: usize) -> Bytes {
    Bytes::from(format!(
        "-ERR pubwarden: at most {max} subscriptions per connection (limits.max_subscriptions)\r\n"
    ))
}

/// Error text must stay on one line or it would break the protocol.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replies_are_single_resp_errors() {
        let r = super::upstream_unavailable("127.0.0.1:1", "refused\r\nx");
        assert_eq!(
            &r[..],
            b"-ERR pubwarden: upstream Redis at 127.0.0.1:1 is unavailable (refused  x)\r\n"
        );
    }
}
