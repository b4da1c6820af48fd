//! A real RTSP server on 127.0.0.1, built with GStreamer's RTSP server library, for the live
//! source tests: it can be stopped (listening socket closed, clients dropped) and started
//! again on the same port, as a camera that reboots would be.
//!
//! Mounts: `/video` serves a live test pattern as RTP/JPEG; `/audio-first` serves an audio
//! track (L16) first and the video second, as many IP cameras announce them.

use std::thread::JoinHandle;

use gstreamer as gst;
use gstreamer::glib;

use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;

const VIDEO: &str = "videotestsrc is-live=true pattern=ball \
     ! video/x-raw,format=I420,width=320,height=240,framerate=15/1 ! jpegenc ! rtpjpegpay";

/// A running server; dropped or [`stop`](Self::stop)ped, it closes its socket and clients.
pub struct RtspServer {
    pub port: u16,
    running: Option<Running>,
}

struct Running {
    server: rtsp_server::RTSPServer,
    context: glib::MainContext,
    main_loop: glib::MainLoop,
    source: Option<glib::SourceId>,
    thread: Option<JoinHandle<()>>,
}

impl RtspServer {
    pub fn start(port: u16) -> RtspServer {
        let mut server = RtspServer { port, running: None };
        server.restart();
        server
    }

    /// `rtsp://127.0.0.1:<port><mount>`.
    pub fn url(&self, mount: &str) -> String {
        format!("rtsp://127.0.0.1:{}{mount}", self.port)
    }

    /// Starts serving (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "already running");
        gst::init().unwrap();
        let server = rtsp_server::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&self.port.to_string());
        let mounts = server.mount_points().unwrap();
        let video = rtsp_server::RTSPMediaFactory::new();
        video.set_launch(&format!("( {VIDEO} name=pay0 pt=26 )"));
        video.set_shared(true);
        mounts.add_factory("/video", video);
        let audio_first = rtsp_server::RTSPMediaFactory::new();
        audio_first.set_launch(&format!(
            "( audiotestsrc is-live=true ! audioconvert ! audio/x-raw,rate=8000,channels=1 \
             ! rtpL16pay name=pay0 pt=96 {VIDEO} name=pay1 pt=26 )"
        ));
        audio_first.set_shared(true);
        mounts.add_factory("/audio-first", audio_first);
        let context = glib::MainContext::new();
        let source = server.attach(Some(&context)).expect("RTSP server cannot listen");
        let main_loop = glib::MainLoop::new(Some(&context), false);
        let (thread_loop, thread_context) = (main_loop.clone(), context.clone());
        let thread = std::thread::spawn(move || {
            thread_context.with_thread_default(|| thread_loop.run()).unwrap();
        });
        self.running = Some(Running {
            server,
            context,
            main_loop,
            source: Some(source),
            thread: Some(thread),
        });
    }

    /// Stops serving: drops every client and closes the listening socket.
    pub fn stop(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        running.server.client_filter(Some(&mut |_, _| rtsp_server::RTSPFilterResult::Remove));
        if let Some(source) = running.source.take()
            && let Some(found) = running.context.find_source_by_id(&source)
        {
            found.destroy();
        }
        running.main_loop.quit();
        if let Some(thread) = running.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.stop();
    }
}
