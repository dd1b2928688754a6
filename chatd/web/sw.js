// The service worker of /chat: shows Web Push notifications when no tab is open (the
// payload is chatd's Notification JSON, decrypted by the browser) and opens the chat.
self.addEventListener("push", (event) => {
  let note = {};
  try {
    note = event.data ? event.data.json() : {};
  } catch {
    note = {};
  }
  const title = note.chat_type === "group" && note.chat_name ? `${note.sender_name} in ${note.chat_name}` : note.sender_name || "chatd";
  const body = note.text || (note.mentioned ? "mentioned you" : "sent a message");
  event.waitUntil(
    self.registration.showNotification(title, {
      body,
      tag: `chat-${note.chat_id}`,
      data: { chat_id: note.chat_id },
      badge: undefined,
    }),
  );
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      for (const client of windows) {
        if (new URL(client.url).pathname.endsWith("/chat")) return client.focus();
      }
      return self.clients.openWindow(new URL("../chat", self.registration.scope).href);
    })(),
  );
});
