//! UDP socket tuning for the endpoints this crate creates or is handed.

use std::net::UdpSocket;

use quinn::udp::UdpSocketState;

/// Raises the socket's send and receive buffers to `bytes` where they are smaller (the kernel
/// caps the request at `net.core.wmem_max` / `rmem_max`). With the kernel default (about
/// 208 KiB) a burst of a few hundred full-size datagrams overflows the receive buffer, and
/// every overflow is a loss the congestion controller answers.
pub(crate) fn size_buffers(socket: &UdpSocket, bytes: usize) {
    let state = match UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "UDP buffers left as they are");
            return;
        }
    };
    if state
        .send_buffer_size(socket.into())
        .is_ok_and(|now| now < bytes)
    {
        let _ = state.set_send_buffer_size(socket.into(), bytes);
    }
    if state
        .recv_buffer_size(socket.into())
        .is_ok_and(|now| now < bytes)
    {
        let _ = state.set_recv_buffer_size(socket.into(), bytes);
    }
    tracing::debug!(
        wanted = bytes,
        send = state.send_buffer_size(socket.into()).unwrap_or(0),
        recv = state.recv_buffer_size(socket.into()).unwrap_or(0),
        "UDP socket buffers"
    );
}
